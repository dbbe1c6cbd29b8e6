//! Kubernetes label selectors (`matchLabels`, `matchExpressions`) evaluated against [`Labels`].
//!
//! A selector is a conjunction of requirements; the empty selector matches every label set.
//! Keys follow Cilium's selector rules: `k8s:app` matches only the `k8s` source, `any:app` and
//! a bare `app` match a label of that key from any source (Cilium gives selector keys the
//! source `any` when they have none). `reserved:` keys are refused: reserved identities are
//! selected with entities (`fromEntities`), not with endpoint selectors.

use std::collections::BTreeSet;

use thiserror::Error;

use crate::labels::{Labels, NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX};

/// The source that matches labels of every source.
pub const ANY_SOURCE: &str = "any";

/// A label selector: every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// One requirement of a [`Selector`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    key: SelectorKey,
    operator: Operator,
}

/// The key a requirement looks at: a source (or any source) and a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorKey {
    /// `None`: any source.
    source: Option<String>,
    key: String,
}

/// How a requirement tests the values of its key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operator {
    /// The label exists and its value is one of these.
    In(BTreeSet<String>),
    /// The label is absent or its value is none of these.
    NotIn(BTreeSet<String>),
    /// The label exists.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One `matchExpressions` item as written, before validation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawExpression {
    /// `key`.
    pub key: String,
    /// `operator`.
    pub operator: String,
    /// `values`, `None` when absent.
    pub values: Option<Vec<String>>,
}

impl Selector {
    /// The selector that matches everything (`{}`).
    #[must_use]
    pub fn everything() -> Self {
        Self::default()
    }

    /// Builds a selector from `matchLabels` and `matchExpressions`.
    ///
    /// # Errors
    ///
    /// [`SelectorError`] naming the field (`matchLabels.app`, `matchExpressions[1].values`): an
    /// empty or `reserved:` key, an unknown operator, `In`/`NotIn` without values,
    /// `Exists`/`DoesNotExist` with values.
    pub fn from_parts(
        match_labels: &[(String, String)],
        match_expressions: &[RawExpression],
    ) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in match_labels {
            let path = format!("matchLabels.{key}");
            let key = SelectorKey::parse(key).map_err(|problem| SelectorError {
                path: path.clone(),
                problem,
            })?;
            requirements.push(Requirement {
                key,
                operator: Operator::In(BTreeSet::from([value.clone()])),
            });
        }
        for (index, expression) in match_expressions.iter().enumerate() {
            let bad = |field: &str, problem| SelectorError {
                path: format!("matchExpressions[{index}].{field}"),
                problem,
            };
            let key = SelectorKey::parse(&expression.key).map_err(|p| bad("key", p))?;
            let values = expression.values.as_deref().unwrap_or_default();
            let needs_values = |values: &[String]| {
                if values.is_empty() {
                    Err(bad(
                        "values",
                        SelectorProblem::ValuesRequired {
                            operator: expression.operator.clone(),
                        },
                    ))
                } else {
                    Ok(values.iter().cloned().collect())
                }
            };
            let no_values = |values: &[String]| {
                if values.is_empty() && expression.values.is_none() {
                    Ok(())
                } else {
                    Err(bad(
                        "values",
                        SelectorProblem::ValuesNotAllowed {
                            operator: expression.operator.clone(),
                        },
                    ))
                }
            };
            let operator = match expression.operator.as_str() {
                "In" => Operator::In(needs_values(values)?),
                "NotIn" => Operator::NotIn(needs_values(values)?),
                "Exists" => no_values(values).map(|()| Operator::Exists)?,
                "DoesNotExist" => no_values(values).map(|()| Operator::DoesNotExist)?,
                other => {
                    return Err(bad(
                        "operator",
                        SelectorProblem::UnknownOperator {
                            operator: other.to_owned(),
                        },
                    ));
                }
            };
            requirements.push(Requirement { key, operator });
        }
        Ok(Self { requirements })
    }

    /// Whether `labels` meets every requirement.
    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether a requirement looks at `key` (of source `k8s` or any source): used to decide
    /// whether a selector already says which namespace it means.
    #[must_use]
    pub fn mentions_key(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| {
            r.key.key == key
                && r.key
                    .source
                    .as_deref()
                    .is_none_or(|s| s == crate::labels::DEFAULT_SOURCE)
        })
    }

    /// This selector restricted to pods of `namespace`.
    #[must_use]
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.requirements.push(Requirement {
            key: SelectorKey {
                source: Some(crate::labels::DEFAULT_SOURCE.to_owned()),
                key: NAMESPACE_KEY.to_owned(),
            },
            operator: Operator::In(BTreeSet::from([namespace.to_owned()])),
        });
        self
    }

    /// A NetworkPolicy `namespaceSelector` turned into a selector of pods: each key `k`
    /// becomes the namespace label Cilium copies onto pods, `io.cilium.k8s.namespace.labels.k`.
    #[must_use]
    pub fn of_namespace_labels(self) -> Self {
        let requirements = self
            .requirements
            .into_iter()
            .map(|r| Requirement {
                key: SelectorKey {
                    source: r.key.source,
                    key: format!("{NAMESPACE_LABELS_PREFIX}{}", r.key.key),
                },
                operator: r.operator,
            })
            .collect();
        Self { requirements }
    }

    /// Both selectors' requirements.
    #[must_use]
    pub fn and(mut self, other: Self) -> Self {
        self.requirements.extend(other.requirements);
        self
    }

    /// The requirements, in order.
    #[must_use]
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

impl Requirement {
    /// The key it looks at.
    #[must_use]
    pub fn key(&self) -> &SelectorKey {
        &self.key
    }

    /// How it tests the values.
    #[must_use]
    pub fn operator(&self) -> &Operator {
        &self.operator
    }

    fn matches(&self, labels: &Labels) -> bool {
        let wanted = &self.key;
        let mut values = labels
            .iter()
            .filter(|(key, _)| {
                key.key() == wanted.key
                    && wanted.source.as_deref().is_none_or(|s| s == key.source())
            })
            .map(|(_, value)| value);
        match &self.operator {
            Operator::In(set) => values.any(|v| set.contains(v)),
            Operator::NotIn(set) => !values.any(|v| set.contains(v)),
            Operator::Exists => values.next().is_some(),
            Operator::DoesNotExist => values.next().is_none(),
        }
    }
}

impl SelectorKey {
    /// The source, `None` for any.
    #[must_use]
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The key without its source.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    fn parse(text: &str) -> Result<Self, SelectorProblem> {
        let (source, key) = match text.split_once(':') {
            Some((source, key)) => (Some(source), key),
            None => (None, text),
        };
        if key.is_empty() {
            return Err(SelectorProblem::EmptyKey);
        }
        let source = match source {
            None | Some(ANY_SOURCE) => None,
            Some("reserved") => return Err(SelectorProblem::ReservedSource),
            Some("") => return Err(SelectorProblem::EmptySource),
            Some(source) => Some(source.to_owned()),
        };
        Ok(Self {
            source,
            key: key.to_owned(),
        })
    }
}

/// A selector that could not be built; `path` is relative to the selector.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}: {problem}")]
pub struct SelectorError {
    /// The field, e.g. `matchExpressions[0].values`.
    pub path: String,
    /// What is wrong with it.
    pub problem: SelectorProblem,
}

/// What is wrong with a selector field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SelectorProblem {
    /// An empty key.
    #[error("empty label key")]
    EmptyKey,
    /// An empty source before `:`.
    #[error("empty label source")]
    EmptySource,
    /// A `reserved:` key.
    #[error("reserved labels cannot be selected; use fromEntities/toEntities")]
    ReservedSource,
    /// Not one of In, NotIn, Exists, DoesNotExist.
    #[error("unknown operator {operator:?} (expected In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator {
        /// The operator as written.
        operator: String,
    },
    /// In/NotIn without values.
    #[error("operator {operator} needs at least one value")]
    ValuesRequired {
        /// The operator.
        operator: String,
    },
    /// Exists/DoesNotExist with values.
    #[error("operator {operator} takes no values")]
    ValuesNotAllowed {
        /// The operator.
        operator: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(text: &str) -> Labels {
        text.parse().unwrap()
    }

    fn expr(key: &str, operator: &str, values: Option<&[&str]>) -> RawExpression {
        RawExpression {
            key: key.into(),
            operator: operator.into(),
            values: values.map(|v| v.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    fn match_labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(Selector::everything().matches(&Labels::new()));
        assert!(Selector::everything().matches(&labels("app=x")));
    }

    #[test]
    fn match_labels_with_source_prefixes() {
        let pod = labels("org=empire,container:class=deathstar");
        for (key, value, expected) in [
            ("org", "empire", true),
            ("k8s:org", "empire", true),
            ("any:org", "empire", true),
            ("org", "alliance", false),
            ("container:org", "empire", false),
            ("class", "deathstar", true),
            ("k8s:class", "deathstar", false),
            ("container:class", "deathstar", true),
        ] {
            let selector = Selector::from_parts(&match_labels(&[(key, value)]), &[]).unwrap();
            assert_eq!(selector.matches(&pod), expected, "{key}={value}");
        }
    }

    #[test]
    fn expressions() {
        let pod = labels("app=web,tier=front");
        let check = |e: RawExpression| Selector::from_parts(&[], &[e]).unwrap().matches(&pod);
        assert!(check(expr("app", "In", Some(&["web", "api"]))));
        assert!(!check(expr("app", "In", Some(&["api"]))));
        assert!(!check(expr("missing", "In", Some(&["x"]))));
        assert!(check(expr("app", "NotIn", Some(&["api"]))));
        assert!(!check(expr("app", "NotIn", Some(&["web"]))));
        assert!(check(expr("missing", "NotIn", Some(&["x"]))));
        assert!(check(expr("tier", "Exists", None)));
        assert!(!check(expr("missing", "Exists", None)));
        assert!(check(expr("missing", "DoesNotExist", None)));
        assert!(!check(expr("k8s:tier", "DoesNotExist", None)));
    }

    #[test]
    fn requirements_are_anded() {
        let selector = Selector::from_parts(
            &match_labels(&[("app", "web")]),
            &[expr("tier", "In", Some(&["back"]))],
        )
        .unwrap();
        assert!(!selector.matches(&labels("app=web,tier=front")));
        assert!(selector.matches(&labels("app=web,tier=back")));
    }

    #[test]
    fn validation_names_the_field() {
        let err = |exprs: &[RawExpression]| Selector::from_parts(&[], exprs).unwrap_err();
        let e = err(&[expr("a", "Exists", None), expr("a", "In", None)]);
        assert_eq!(e.path, "matchExpressions[1].values");
        assert_eq!(
            e.to_string(),
            "matchExpressions[1].values: operator In needs at least one value"
        );
        let e = err(&[expr("a", "NotIn", Some(&[]))]);
        assert!(matches!(e.problem, SelectorProblem::ValuesRequired { .. }));
        let e = err(&[expr("a", "Exists", Some(&[]))]);
        assert!(matches!(
            e.problem,
            SelectorProblem::ValuesNotAllowed { .. }
        ));
        let e = err(&[expr("a", "DoesNotExist", Some(&["x"]))]);
        assert!(matches!(
            e.problem,
            SelectorProblem::ValuesNotAllowed { .. }
        ));
        let e = err(&[expr("a", "Equals", Some(&["x"]))]);
        assert_eq!(e.path, "matchExpressions[0].operator");
        let e = err(&[expr("reserved:host", "Exists", None)]);
        assert_eq!(e.problem, SelectorProblem::ReservedSource);
        let e = Selector::from_parts(&match_labels(&[("k8s:", "x")]), &[]).unwrap_err();
        assert_eq!(e.path, "matchLabels.k8s:");
        assert_eq!(e.problem, SelectorProblem::EmptyKey);
    }

    #[test]
    fn namespace_scoping_and_namespace_labels() {
        let pod = crate::labels::Labels::for_pod(
            "prod",
            &[("app".to_owned(), "web".to_owned())].into(),
            &[("team".to_owned(), "blue".to_owned())].into(),
        );
        let app = Selector::from_parts(&match_labels(&[("app", "web")]), &[]).unwrap();
        assert!(app.clone().in_namespace("prod").matches(&pod));
        assert!(!app.clone().in_namespace("dev").matches(&pod));
        assert!(!app.mentions_key(NAMESPACE_KEY));
        let ns = Selector::from_parts(
            &match_labels(&[("k8s:io.kubernetes.pod.namespace", "x")]),
            &[],
        )
        .unwrap();
        assert!(ns.mentions_key(NAMESPACE_KEY));
        let team = Selector::from_parts(&match_labels(&[("team", "blue")]), &[]).unwrap();
        assert!(!team.clone().matches(&pod));
        assert!(team.of_namespace_labels().matches(&pod));
    }
}
