//! Explains the verdict of one flow (`nodeseal policy trace`): evaluates the rules directly,
//! without identities or the compiled table, and names the rule that decided.
//!
//! A flow from a source to a destination passes two checks, as in the datapath: egress at the
//! source (when it is a pod) and ingress at the destination (when it is a pod). In each, the
//! verdict follows the crate's semantics: not enforced when no rule of the direction selects
//! the pod, else denied by the first matching deny rule, else allowed by the first matching
//! allow rule, else denied by default. "First" is the order of the policies given, then of
//! their rules.

use std::{fmt, net::IpAddr};

use crate::{
    labels::Labels,
    rule::{Action, Direction, PeerIdentity, Policy, PolicyKind},
};

/// One side of a traced flow.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Party {
    /// A pod with these security-relevant labels (see [`Labels::for_pod`]).
    Pod(Labels),
    /// The local host.
    Host,
    /// Another cluster node.
    RemoteNode,
    /// An address outside the cluster that no CIDR rule covers.
    World,
    /// An address outside the cluster; CIDR rules that contain it apply.
    Address(IpAddr),
}

impl Party {
    fn peer_identity(&self) -> PeerIdentity<'_> {
        match self {
            Self::Pod(labels) => PeerIdentity::Workload(labels),
            Self::Host => PeerIdentity::Host,
            Self::RemoteNode => PeerIdentity::RemoteNode,
            Self::World => PeerIdentity::World,
            Self::Address(address) => PeerIdentity::address(*address),
        }
    }
}

/// The two checks of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// Egress at the source.
    pub egress: Decision,
    /// Ingress at the destination.
    pub ingress: Decision,
}

impl Trace {
    /// Whether the flow gets through both checks.
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No rule of the direction selects the pod (or the party is not a pod): allowed.
    NotEnforced,
    /// Allowed by this rule, and no deny rule matches.
    Allowed(RuleRef),
    /// Denied by this rule.
    Denied(RuleRef),
    /// Enforced, and no allow rule matches.
    DeniedByDefault,
}

impl Decision {
    /// Whether the check lets the flow through.
    #[must_use]
    pub fn allows(&self) -> bool {
        matches!(self, Self::NotEnforced | Self::Allowed(_))
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotEnforced => f.write_str("not enforced"),
            Self::Allowed(rule) => write!(f, "allowed by {rule}"),
            Self::Denied(rule) => write!(f, "denied by {rule}"),
            Self::DeniedByDefault => f.write_str("denied by default (no rule allows)"),
        }
    }
}

/// A rule of a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    /// The policy's kind.
    pub kind: PolicyKind,
    /// `namespace/name` for namespaced kinds, else `name`.
    pub policy: String,
    /// Index of the rule in [`Policy::rules`].
    pub rule: usize,
    /// Where the rule is written in the document, e.g. `spec.ingress[0]`.
    pub origin: String,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} rule {} ({})",
            self.kind, self.policy, self.rule, self.origin
        )
    }
}

/// Traces traffic of `protocol` to `port` (0 when it has none) from `source` to
/// `destination`.
#[must_use]
pub fn trace(
    policies: &[Policy],
    source: &Party,
    destination: &Party,
    protocol: u8,
    port: u16,
) -> Trace {
    let check = |subject: &Party, peer: &Party, direction| match subject {
        Party::Pod(labels) => decide(
            policies,
            labels,
            direction,
            &peer.peer_identity(),
            protocol,
            port,
        ),
        _ => Decision::NotEnforced,
    };
    Trace {
        egress: check(source, destination, Direction::Egress),
        ingress: check(destination, source, Direction::Ingress),
    }
}

fn decide(
    policies: &[Policy],
    subject: &Labels,
    direction: Direction,
    peer: &PeerIdentity<'_>,
    protocol: u8,
    port: u16,
) -> Decision {
    let mut enforced = false;
    let mut allowed_by = None;
    for policy in policies {
        for (index, rule) in policy.rules.iter().enumerate() {
            if rule.direction != direction || !rule.subject.matches(subject) {
                continue;
            }
            enforced = true;
            if !rule.matches_peer(peer) || !rule.matches_traffic(protocol, port) {
                continue;
            }
            let reference = || RuleRef {
                kind: policy.kind,
                policy: match &policy.namespace {
                    Some(namespace) => format!("{namespace}/{}", policy.name),
                    None => policy.name.clone(),
                },
                rule: index,
                origin: rule.origin.clone(),
            };
            match rule.action {
                Action::Deny => return Decision::Denied(reference()),
                Action::Allow => {
                    allowed_by.get_or_insert_with(reference);
                }
            }
        }
    }
    match (enforced, allowed_by) {
        (false, _) => Decision::NotEnforced,
        (true, Some(rule)) => Decision::Allowed(rule),
        (true, None) => Decision::DeniedByDefault,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        document::parse,
        test_support::{Case, RULE1, Rng, random_case, semantic_allows},
    };

    fn pod(labels: &str) -> Party {
        let mut labels: Labels = labels.parse().unwrap();
        labels.insert(
            crate::labels::LabelKey::k8s(crate::labels::NAMESPACE_KEY),
            "default".to_owned(),
        );
        Party::Pod(labels)
    }

    #[test]
    fn star_wars() {
        let policies = parse(RULE1.as_bytes()).unwrap();
        let deathstar = pod("org=empire,class=deathstar");
        let tiefighter = pod("org=empire,class=tiefighter");
        let xwing = pod("org=alliance,class=xwing");

        let landing = trace(&policies, &tiefighter, &deathstar, 6, 80);
        assert!(landing.allowed());
        assert_eq!(landing.egress, Decision::NotEnforced);
        let expected = RuleRef {
            kind: PolicyKind::CiliumNetworkPolicy,
            policy: "default/rule1".into(),
            rule: 0,
            origin: "spec.ingress[0]".into(),
        };
        assert_eq!(landing.ingress, Decision::Allowed(expected));
        assert_eq!(
            landing.ingress.to_string(),
            "allowed by CiliumNetworkPolicy \"default/rule1\" rule 0 (spec.ingress[0])"
        );

        let attack = trace(&policies, &xwing, &deathstar, 6, 80);
        assert!(!attack.allowed());
        assert_eq!(attack.ingress, Decision::DeniedByDefault);
        assert_eq!(
            attack.ingress.to_string(),
            "denied by default (no rule allows)"
        );
        assert!(!trace(&policies, &tiefighter, &deathstar, 6, 81).allowed());
        // The deathstar's egress is not enforced.
        assert!(trace(&policies, &deathstar, &xwing, 17, 53).allowed());
        assert!(!trace(&policies, &Party::World, &deathstar, 6, 80).allowed());
    }

    #[test]
    fn deny_rules_and_addresses() {
        let text = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: out}\n\
            spec:\n  endpointSelector: {}\n  egress: [{toEntities: [world]}]\n\
            \x20 egressDeny: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]}]\n";
        let policies = parse(text.as_bytes()).unwrap();
        let client = pod("app=client");
        let to = |address: &str| {
            trace(
                &policies,
                &client,
                &Party::Address(address.parse().unwrap()),
                6,
                443,
            )
        };
        assert!(to("8.8.8.8").allowed());
        assert!(to("10.1.0.1").allowed());
        let denied = to("10.2.0.1");
        assert!(
            matches!(&denied.egress, Decision::Denied(rule) if rule.origin == "spec.egressDeny[0]")
        );
        assert_eq!(denied.ingress, Decision::NotEnforced);
        assert_eq!(
            trace(&policies, &client, &Party::Host, 6, 443).egress,
            Decision::DeniedByDefault
        );
    }

    /// Trace agrees with the rules' semantics on random policy sets, for every pair of pods.
    #[test]
    fn agrees_with_semantics() {
        let mut rng = Rng::new(0x7ace);
        for _ in 0..100 {
            let Case {
                policies,
                identities,
                ports,
                ..
            } = random_case(&mut rng);
            for (&source, source_labels) in &identities.workloads {
                for (&destination, destination_labels) in &identities.workloads {
                    let egress = semantic_allows(
                        &policies,
                        &identities,
                        source,
                        Direction::Egress,
                        destination,
                    );
                    let ingress = semantic_allows(
                        &policies,
                        &identities,
                        destination,
                        Direction::Ingress,
                        source,
                    );
                    for protocol in [6, 17, 132, 1] {
                        for &port in &ports {
                            let traced = trace(
                                &policies,
                                &Party::Pod(source_labels.clone()),
                                &Party::Pod(destination_labels.clone()),
                                protocol,
                                port,
                            );
                            assert_eq!(traced.egress.allows(), egress(protocol, port));
                            assert_eq!(traced.ingress.allows(), ingress(protocol, port));
                        }
                    }
                }
            }
        }
    }
}
