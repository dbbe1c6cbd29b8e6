//! `nodeseal policy|identity|endpoint`: identity policy in the cluster store.
//!
//! Policy documents are parsed with nodeseal-policy before anything is stored, so a refused
//! document names its field and stores nothing. `policy trace` evaluates the stored policies
//! with `nodeseal_policy::trace` for a flow between two label sets: egress at the source,
//! ingress at the destination, and the rule that decided each.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use nodeseal_policy::labels::{LabelKey, Labels, NAMESPACE_KEY};
use nodeseal_policy::rule::{Policy, protocol_number};
use nodeseal_policy::trace::{Party, Trace};
use nodeseal_store::{
    Endpoint, EndpointId, Identity, IdentityClaim, IdentityNumber, LabelsDigest, NodeName,
    PolicyDocument, Store,
};

use super::Format;
use crate::config::StoreArgs;

/// `nodeseal policy …`.
#[derive(Subcommand, Debug)]
pub(super) enum PolicyCommand {
    /// Store a policy file (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or
    /// NetworkPolicy; YAML or JSON) after checking it. With --kubernetes, create or update the
    /// objects instead: NodesealNetworkPolicy (from CiliumNetworkPolicy too),
    /// NodesealClusterwideNetworkPolicy (from CiliumClusterwideNetworkPolicy too), NetworkPolicy.
    Apply {
        /// The file (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// The name to store it under (default: the first policy's `metadata.name`).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show stored policies: all of them, or one.
    Get {
        /// The stored name.
        name: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete a stored policy.
    Delete {
        /// The stored name.
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Say whether the stored policies allow a flow, and which rule decided.
    Trace(TraceArgs),
}

/// `nodeseal policy trace` arguments.
#[derive(clap::Args, Debug)]
pub(super) struct TraceArgs {
    /// The source pod's labels, `k=v,...` (a key may carry a source: `k8s:app=web`).
    #[arg(long, value_parser = parse_labels)]
    src_labels: Labels,
    /// The destination pod's labels.
    #[arg(long, value_parser = parse_labels)]
    dst_labels: Labels,
    /// The source's namespace (or `io.kubernetes.pod.namespace=` in `--src-labels`).
    #[arg(long)]
    src_namespace: Option<String>,
    /// The destination's namespace (or `io.kubernetes.pod.namespace=` in `--dst-labels`).
    #[arg(long)]
    dst_namespace: Option<String>,
    /// Destination port and protocol: `80/TCP`, `53/UDP`, `9000/SCTP` (`80` alone is TCP).
    #[arg(long, value_parser = parse_port)]
    dport: PortProtocol,
    #[command(flatten)]
    store: StoreArgs,
}

/// `nodeseal identity …`.
#[derive(Subcommand, Debug)]
pub(super) enum IdentityCommand {
    /// List the cluster's workload identities.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show one identity's labels.
    Get {
        /// The identity number (256 or above).
        #[arg(value_parser = parse_identity)]
        id: IdentityNumber,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete the identities that no endpoint record uses (standalone modes only: in
    /// Kubernetes mode the endpoints are Pods, which this does not read).
    Gc {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// `nodeseal endpoint …` (standalone modes: directory and etcd stores).
#[derive(Subcommand, Debug)]
pub(super) enum EndpointCommand {
    /// Record a workload and allocate the identity of its labels.
    Add {
        #[command(flatten)]
        id: EndpointArgs,
        /// Its labels, `k=v,...` (the namespace label is added from `--endpoint-namespace`).
        #[arg(long, value_parser = parse_labels, default_value = "")]
        labels: Labels,
        /// An IP of the workload (repeat, or comma-separate, for more).
        #[arg(long = "ip", required = true, value_delimiter = ',')]
        ips: Vec<IpAddr>,
        /// The host-side interface (veth) name.
        #[arg(long, value_parser = parse_interface)]
        interface: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove a workload's record.
    Remove {
        #[command(flatten)]
        id: EndpointArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List workloads with their identities.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Which endpoint.
#[derive(clap::Args, Debug)]
pub(super) struct EndpointArgs {
    /// The node it runs on.
    #[arg(long, value_parser = parse_name)]
    node: NodeName,
    /// Its name.
    #[arg(long, value_parser = parse_name)]
    name: NodeName,
    /// Its namespace. (`--namespace` is taken by the store flags: the namespace of
    /// nodeseal's own objects in Kubernetes mode.)
    #[arg(
        long = "endpoint-namespace",
        visible_alias = "ns",
        value_parser = parse_name,
        default_value = "default"
    )]
    endpoint_namespace: NodeName,
}

impl EndpointArgs {
    fn id(&self) -> EndpointId {
        EndpointId {
            node: self.node.clone(),
            namespace: self.endpoint_namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// A destination port and its IP protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PortProtocol {
    port: u16,
    protocol: u8,
    protocol_name: &'static str,
}

fn parse_labels(text: &str) -> Result<Labels, String> {
    text.parse::<Labels>().map_err(|e| e.to_string())
}

fn parse_name(text: &str) -> Result<NodeName, String> {
    NodeName::new(text).map_err(|e| e.to_string())
}

fn parse_identity(text: &str) -> Result<IdentityNumber, String> {
    text.parse()
}

fn parse_interface(text: &str) -> Result<String, String> {
    nodeseal_store::check_interface(text).map(|()| text.to_owned())
}

fn parse_port(text: &str) -> Result<PortProtocol, String> {
    let (port, protocol) = text.split_once('/').unwrap_or((text, "TCP"));
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port:?} is not a port between 1 and 65535"))?;
    let (protocol, protocol_name) = match protocol.to_ascii_uppercase().as_str() {
        "TCP" => (protocol_number::TCP, "TCP"),
        "UDP" => (protocol_number::UDP, "UDP"),
        "SCTP" => (protocol_number::SCTP, "SCTP"),
        _ => return Err(format!("protocol {protocol:?} is not TCP, UDP or SCTP")),
    };
    Ok(PortProtocol {
        port,
        protocol,
        protocol_name,
    })
}

/// Adds the namespace from `flag` to `labels`; one of the two must give it, and they must
/// agree. `argument` names the labels argument in errors.
fn with_namespace(
    mut labels: Labels,
    flag: Option<&str>,
    argument: &str,
    flag_name: &str,
) -> Result<Labels> {
    let key = LabelKey::k8s(NAMESPACE_KEY);
    match (labels.get(&key), flag) {
        (Some(given), Some(flag)) if given != flag => {
            bail!("{argument} says namespace {given:?} but {flag_name} says {flag:?}")
        }
        (Some(_), _) => {}
        (None, Some(flag)) => {
            labels.insert(key, flag.to_owned());
        }
        (None, None) => {
            bail!("{argument}: no namespace: add {NAMESPACE_KEY}=<namespace> or give {flag_name}")
        }
    }
    Ok(labels)
}

/// The policies of every stored document; documents that fail to parse are reported on
/// standard error and skipped (they were checked when stored: this is a changed parser or a
/// hand edit).
async fn stored_policies(store: &Store) -> Result<Vec<Policy>> {
    let listing = store.list::<PolicyDocument>().await?;
    for bad in &listing.invalid {
        eprintln!("skipping invalid record: {bad}");
    }
    let mut policies = Vec::new();
    for document in &listing.records {
        match document.policies() {
            Ok(parsed) => policies.extend(parsed),
            Err(error) => eprintln!("skipping policy {}: {error}", document.name),
        }
    }
    Ok(policies)
}

/// Runs `nodeseal policy …`.
pub(super) async fn policy(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Apply { file, name, store } => {
            let bytes = if file.as_os_str() == "-" {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                    .context("reading standard input")?;
                bytes
            } else {
                std::fs::read(&file).with_context(|| format!("-f {}", file.display()))?
            };
            // Parsed before the store is opened: a refused document stores nothing.
            let policies = nodeseal_policy::document::parse(&bytes)
                .with_context(|| format!("-f {}: refused", file.display()))?;
            let Some(first) = policies.first() else {
                bail!("-f {}: holds no policy", file.display());
            };
            if store.kubernetes {
                return super::kube_policy::apply(&store, &bytes, name.is_some()).await;
            }
            let named = name.is_some();
            let name = match name {
                Some(name) => NodeName::new(name).context("--name")?,
                None => NodeName::new(first.name.clone()).context(
                    "the first policy's metadata.name is no valid store name; give --name",
                )?,
            };
            let first = qualified_name(first);
            let document = PolicyDocument {
                name: name.clone(),
                document: String::from_utf8(bytes).context("the file is not UTF-8")?,
            };
            let store = store.open().await?;
            let existing = store.get::<PolicyDocument>(&name).await.ok().flatten();
            // Without --name the store name is metadata.name, which two namespaces may share:
            // replacing another namespace's policy by accident would be silent, so refuse it.
            if let Some(existing) = &existing
                && !named
            {
                let stored = existing
                    .policies()
                    .ok()
                    .and_then(|p| p.first().map(qualified_name));
                if stored.as_deref().is_some_and(|stored| stored != first) {
                    bail!(
                        "policy {name} holds {} already, not {first}; give --name to store \
                         both, or to replace it",
                        stored.unwrap_or_default()
                    );
                }
            }
            let existed = existing.is_some();
            store.put(&document).await?;
            let kinds: Vec<String> = policies
                .iter()
                .map(|p| format!("{} {}", p.kind, qualified_name(p)))
                .collect();
            println!(
                "policy {name} {} ({})",
                if existed { "replaced" } else { "stored" },
                kinds.join(", ")
            );
        }
        PolicyCommand::Get {
            name,
            output,
            store,
        } => {
            let store = store.open().await?;
            let documents = match name {
                Some(name) => {
                    let name = NodeName::new(name).context("NAME")?;
                    match store.get::<PolicyDocument>(&name).await? {
                        Some(document) => vec![document],
                        None => bail!("no policy {name}"),
                    }
                }
                None => {
                    let listing = store.list::<PolicyDocument>().await?;
                    for bad in &listing.invalid {
                        eprintln!("invalid record: {bad}");
                    }
                    listing.records
                }
            };
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&documents)?),
                Format::Text => print!("{}", render_policies(&documents)),
            }
        }
        PolicyCommand::Delete { name, store } => {
            let name = NodeName::new(name).context("NAME")?;
            let store = store.open().await?;
            if !store.delete::<PolicyDocument>(&name).await? {
                bail!("no policy {name}");
            }
            println!("policy {name} deleted");
        }
        PolicyCommand::Trace(args) => {
            let source = with_namespace(
                args.src_labels,
                args.src_namespace.as_deref(),
                "--src-labels",
                "--src-namespace",
            )?;
            let destination = with_namespace(
                args.dst_labels,
                args.dst_namespace.as_deref(),
                "--dst-labels",
                "--dst-namespace",
            )?;
            let store = args.store.open().await?;
            let policies = stored_policies(&store).await?;
            let trace = nodeseal_policy::trace::trace(
                &policies,
                &Party::Pod(source.clone()),
                &Party::Pod(destination.clone()),
                args.dport.protocol,
                args.dport.port,
            );
            print!(
                "{}",
                render_trace(&source, &destination, args.dport, &trace)
            );
        }
    }
    Ok(())
}

fn qualified_name(policy: &Policy) -> String {
    match &policy.namespace {
        Some(namespace) => format!("{namespace}/{}", policy.name),
        None => policy.name.clone(),
    }
}

/// `NAME  POLICIES` lines, one per stored document.
fn render_policies(documents: &[PolicyDocument]) -> String {
    let mut out = format!("{:<24} POLICIES\n", "NAME");
    for document in documents {
        let what = match document.policies() {
            Ok(policies) => policies
                .iter()
                .map(|p| format!("{} {} ({} rules)", p.kind, qualified_name(p), p.rules.len()))
                .collect::<Vec<_>>()
                .join(", "),
            Err(error) => format!("invalid: {error}"),
        };
        let _ = writeln!(out, "{:<24} {what}", document.name.as_str());
    }
    out
}

/// The trace as the operator reads it: the flow, each check's decision, the verdict.
fn render_trace(
    source: &Labels,
    destination: &Labels,
    dport: PortProtocol,
    trace: &Trace,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "from:    {source}");
    let _ = writeln!(out, "to:      {destination}");
    let _ = writeln!(out, "port:    {}/{}", dport.port, dport.protocol_name);
    let _ = writeln!(out, "egress:  {} (at the source)", trace.egress);
    let _ = writeln!(out, "ingress: {} (at the destination)", trace.ingress);
    let verdict = if trace.allowed() { "ALLOWED" } else { "DENIED" };
    let _ = writeln!(out, "verdict: {verdict}");
    out
}

/// Runs `nodeseal identity …`.
pub(super) async fn identity(command: IdentityCommand) -> Result<()> {
    match command {
        IdentityCommand::List { output, store } => {
            let store = store.open().await?;
            let listing = store.list::<Identity>().await?;
            for bad in &listing.invalid {
                eprintln!("invalid record: {bad}");
            }
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&listing.records)?),
                Format::Text => print!("{}", render_identities(&listing.records)),
            }
        }
        IdentityCommand::Get { id, output, store } => {
            let store = store.open().await?;
            let Some(identity) = store.get::<Identity>(&id).await? else {
                bail!("no identity {id}");
            };
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&identity)?),
                Format::Text => print!("{}", render_identities(&[identity])),
            }
        }
        IdentityCommand::Gc { store } => {
            if store.kubernetes {
                bail!(
                    "--kubernetes: keymgr allocates identities and collects the ones no pod \
                     uses (after --identity-gc-grace); there is nothing to collect by hand"
                );
            }
            let store = store.open().await?;
            let endpoints = store.list::<Endpoint>().await?;
            if !endpoints.invalid.is_empty() {
                // An unreadable endpoint may use any identity.
                bail!(
                    "{} invalid endpoint records (first: {}); refusing to collect",
                    endpoints.invalid.len(),
                    endpoints.invalid[0]
                );
            }
            let mut in_use = std::collections::BTreeSet::new();
            for endpoint in &endpoints.records {
                let digest = LabelsDigest::of(&endpoint.security_labels());
                if let Some(claim) = store.get::<IdentityClaim>(&digest).await? {
                    in_use.insert(claim.number);
                }
            }
            let deleted = store.gc_identities(&in_use).await?;
            let deleted: Vec<String> = deleted.iter().map(ToString::to_string).collect();
            println!(
                "deleted {} unused identities{}{}",
                deleted.len(),
                if deleted.is_empty() { "" } else { ": " },
                deleted.join(", ")
            );
        }
    }
    Ok(())
}

fn render_identities(identities: &[Identity]) -> String {
    let mut out = format!("{:<10} LABELS\n", "ID");
    for identity in identities {
        let _ = writeln!(out, "{:<10} {}", identity.number, identity.labels);
    }
    out
}

/// Runs `nodeseal endpoint …`.
pub(super) async fn endpoint(command: EndpointCommand) -> Result<()> {
    match command {
        EndpointCommand::Add {
            id,
            labels,
            ips,
            interface,
            store,
        } => {
            if store.kubernetes {
                bail!(
                    "endpoints come from Pod objects in Kubernetes mode; there is nothing to add"
                );
            }
            let endpoint = Endpoint {
                node: id.node,
                namespace: id.endpoint_namespace,
                name: id.name,
                labels,
                ips,
                interface,
            };
            let store = store.open().await?;
            let number = store
                .allocate_identity(&endpoint.security_labels())
                .await
                .context("allocating the identity")?;
            store.put(&endpoint).await?;
            println!("endpoint {} added with identity {number}", endpoint.id());
        }
        EndpointCommand::Remove { id, store } => {
            let store = store.open().await?;
            let id = id.id();
            if !store.delete::<Endpoint>(&id).await? {
                bail!("no endpoint {id}");
            }
            println!("endpoint {id} removed");
        }
        EndpointCommand::List { output, store } => {
            let store = store.open().await?;
            let listing = store.list::<Endpoint>().await?;
            for bad in &listing.invalid {
                eprintln!("invalid record: {bad}");
            }
            let mut rows = Vec::new();
            for endpoint in listing.records {
                let digest = LabelsDigest::of(&endpoint.security_labels());
                let identity = store
                    .get::<IdentityClaim>(&digest)
                    .await
                    .ok()
                    .flatten()
                    .map(|claim| claim.number);
                rows.push((endpoint, identity));
            }
            match output {
                Format::Json => {
                    let json: Vec<serde_json::Value> = rows
                        .iter()
                        .map(|(endpoint, identity)| {
                            let mut value =
                                serde_json::to_value(endpoint).unwrap_or(serde_json::Value::Null);
                            value["identity"] = serde_json::json!(identity.map(u32::from));
                            value
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&json)?);
                }
                Format::Text => print!("{}", render_endpoints(&rows)),
            }
        }
    }
    Ok(())
}

fn render_endpoints(rows: &[(Endpoint, Option<IdentityNumber>)]) -> String {
    let mut out = format!(
        "{:<32} {:<16} {:<9} {:<12} {:<20} LABELS\n",
        "ENDPOINT", "NODE", "IDENTITY", "INTERFACE", "IPS"
    );
    for (endpoint, identity) in rows {
        let ips: Vec<String> = endpoint.ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "{:<32} {:<16} {:<9} {:<12} {:<20} {}",
            format!("{}/{}", endpoint.namespace, endpoint.name),
            endpoint.node.as_str(),
            identity.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            endpoint.interface,
            ips.join(","),
            endpoint.security_labels()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use nodeseal_policy::rule::PolicyKind;
    use nodeseal_policy::trace::{Decision, RuleRef};

    use super::*;
    use crate::cli::Cli;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nodeseal").chain(args.iter().copied()))
    }

    fn error_of(args: &[&str]) -> String {
        parse(args).expect_err("refused").to_string()
    }

    #[test]
    fn ports_and_protocols_parse() {
        assert_eq!(
            parse_port("80/TCP"),
            Ok(PortProtocol {
                port: 80,
                protocol: 6,
                protocol_name: "TCP"
            })
        );
        assert_eq!(parse_port("53/udp").map(|p| p.protocol), Ok(17));
        assert_eq!(parse_port("9000/SCTP").map(|p| p.protocol), Ok(132));
        assert_eq!(parse_port("443").map(|p| p.protocol), Ok(6));
        assert!(parse_port("0/TCP").is_err());
        assert!(parse_port("70000/TCP").is_err());
        assert!(parse_port("80/ICMP").expect_err("icmp").contains("ICMP"));
    }

    #[test]
    fn bad_arguments_are_named() {
        let trace = |src: &'static str, dport: &'static str| {
            vec![
                "policy",
                "trace",
                "--src-labels",
                src,
                "--dst-labels",
                "a=b",
                "--dport",
                dport,
            ]
        };
        let endpoint = |node: &'static str, ip: &'static str, interface: &'static str| {
            vec![
                "endpoint",
                "add",
                "--node",
                node,
                "--name",
                "e",
                "--ip",
                ip,
                "--interface",
                interface,
            ]
        };
        for (args, named) in [
            (trace("org", "80"), "--src-labels"),
            (trace("a=b", "x/TCP"), "--dport"),
            (endpoint("Node_1", "10.0.0.1", "veth1"), "--node"),
            (
                endpoint("n", "10.0.0.1", "much-too-long-name"),
                "--interface",
            ),
            (endpoint("n", "10.0.0.300", "veth1"), "--ip"),
            (vec!["identity", "get", "6"], "reserved"),
        ] {
            let error = error_of(&args);
            assert!(error.contains(named), "{args:?}: {error}");
        }
        assert!(parse(&["policy", "apply"]).is_err(), "-f is required");
    }

    #[test]
    fn arguments_parse_into_typed_values() {
        let cli = parse(&[
            "endpoint",
            "add",
            "--node",
            "node-1",
            "--name",
            "xwing",
            "--ns",
            "default",
            "--labels",
            "org=alliance,class=xwing",
            "--ip",
            "10.244.3.5,fd00::5",
            "--interface",
            "lxc1",
            "--store-dir",
            "/tmp/x",
        ])
        .expect("parses");
        let crate::cli::Command::Endpoint(EndpointCommand::Add {
            id, labels, ips, ..
        }) = cli.command
        else {
            panic!("unexpected {cli:?}");
        };
        assert_eq!(id.id().to_string(), "node-1:default:xwing");
        assert_eq!(labels.to_string(), "k8s:class=xwing,k8s:org=alliance");
        assert_eq!(ips.len(), 2);
        assert!(parse(&["policy", "get", "-o", "json"]).is_ok());
        assert!(parse(&["policy", "apply", "-f", "p.yaml"]).is_ok());
        assert!(parse(&["identity", "get", "256"]).is_ok());
    }

    #[test]
    fn namespaces_come_from_a_label_or_a_flag() {
        let labels: Labels = "org=empire".parse().expect("labels");
        let with = with_namespace(
            labels.clone(),
            Some("default"),
            "--src-labels",
            "--src-namespace",
        )
        .expect("flag");
        assert_eq!(
            with.to_string(),
            "k8s:io.kubernetes.pod.namespace=default,k8s:org=empire"
        );
        let error = with_namespace(labels, None, "--src-labels", "--src-namespace")
            .expect_err("no namespace")
            .to_string();
        assert!(
            error.contains("--src-labels") && error.contains("--src-namespace"),
            "{error}"
        );
        let labelled: Labels = "io.kubernetes.pod.namespace=a".parse().expect("labels");
        assert!(
            with_namespace(
                labelled.clone(),
                Some("a"),
                "--dst-labels",
                "--dst-namespace"
            )
            .is_ok()
        );
        let error = with_namespace(labelled, Some("b"), "--dst-labels", "--dst-namespace")
            .expect_err("disagree")
            .to_string();
        assert!(
            error.contains("\"a\"") && error.contains("\"b\""),
            "{error}"
        );
    }

    #[test]
    fn identity_table_is_aligned() {
        let identity = Identity {
            number: IdentityNumber::FIRST,
            labels: "k8s:org=empire".parse().expect("labels"),
        };
        assert_eq!(
            render_identities(&[identity]),
            "ID         LABELS\n256        k8s:org=empire\n"
        );
    }

    #[test]
    fn trace_output_names_the_deciding_rules_and_the_verdict() {
        let source: Labels = "k8s:io.kubernetes.pod.namespace=default,k8s:org=alliance"
            .parse()
            .expect("labels");
        let destination: Labels = "k8s:class=deathstar,k8s:io.kubernetes.pod.namespace=default"
            .parse()
            .expect("labels");
        let dport = parse_port("80/TCP").expect("port");
        let denied = Trace {
            egress: Decision::NotEnforced,
            ingress: Decision::DeniedByDefault,
        };
        assert_eq!(
            render_trace(&source, &destination, dport, &denied),
            "from:    k8s:io.kubernetes.pod.namespace=default,k8s:org=alliance\n\
             to:      k8s:class=deathstar,k8s:io.kubernetes.pod.namespace=default\n\
             port:    80/TCP\n\
             egress:  not enforced (at the source)\n\
             ingress: denied by default (no rule allows) (at the destination)\n\
             verdict: DENIED\n"
        );
        let allowed = Trace {
            egress: Decision::NotEnforced,
            ingress: Decision::Allowed(RuleRef {
                kind: PolicyKind::CiliumNetworkPolicy,
                policy: "default/rule1".to_owned(),
                rule: 0,
                origin: "spec.ingress[0]".to_owned(),
            }),
        };
        let text = render_trace(&source, &destination, dport, &allowed);
        assert!(
            text.contains(
                "ingress: allowed by CiliumNetworkPolicy \"default/rule1\" rule 0 (spec.ingress[0])"
            ),
            "{text}"
        );
        assert!(text.ends_with("verdict: ALLOWED\n"), "{text}");
    }
}
