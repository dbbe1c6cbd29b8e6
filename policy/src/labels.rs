//! Security-relevant label sets, as Cilium derives them from a pod and its namespace.
//!
//! A label has a source (`k8s`, `reserved`, `container`, …), a key and a value. Cilium writes
//! labels as `source:key=value`; a label written without a source has the default source,
//! `k8s`. The identity of a workload is one distinct [`Labels`] set, so only labels that say
//! something about security belong here: the pod's own labels, its namespace, and its
//! namespace's labels ([`Labels::for_pod`]).

use std::{collections::BTreeMap, fmt, str::FromStr};

use thiserror::Error;

/// The source of labels written without one (`app=web` is `k8s:app=web`).
pub const DEFAULT_SOURCE: &str = "k8s";
/// The key of the label that carries a pod's namespace.
pub const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";
/// The prefix under which a namespace's own labels are copied onto its pods, so that
/// selectors (and NetworkPolicy `namespaceSelector`s) can match them.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// A label's source and key, written `source:key`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelKey {
    source: String,
    key: String,
}

impl LabelKey {
    /// A key of the default source, `k8s`.
    #[must_use]
    pub fn k8s(key: &str) -> Self {
        Self {
            source: DEFAULT_SOURCE.to_owned(),
            key: key.to_owned(),
        }
    }

    /// The label's source (`k8s`, `reserved`, …).
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The key without its source.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Parses `source:key` or `key` (default source). Kubernetes keys never contain `:`, so
    /// the first `:` separates the source.
    fn parse(text: &str) -> Result<Self, LabelProblem> {
        let (source, key) = match text.split_once(':') {
            Some((source, key)) => (source, key),
            None => (DEFAULT_SOURCE, text),
        };
        if source.is_empty() {
            return Err(LabelProblem::EmptySource);
        }
        if key.is_empty() {
            return Err(LabelProblem::EmptyKey);
        }
        Ok(Self {
            source: source.to_owned(),
            key: key.to_owned(),
        })
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.key)
    }
}

/// A set of labels, sorted by source and key; each key has one value.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(BTreeMap<LabelKey, String>);

impl Labels {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The security-relevant labels of a pod, as Cilium builds them: the pod's labels, its
    /// namespace as `io.kubernetes.pod.namespace`, and each namespace label `k=v` as
    /// `io.cilium.k8s.namespace.labels.k=v`, all with source `k8s`.
    #[must_use]
    pub fn for_pod(
        namespace: &str,
        pod_labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
    ) -> Self {
        let mut labels = Self::new();
        for (key, value) in pod_labels {
            labels.insert(LabelKey::k8s(key), value.clone());
        }
        for (key, value) in namespace_labels {
            labels.insert(
                LabelKey::k8s(&format!("{NAMESPACE_LABELS_PREFIX}{key}")),
                value.clone(),
            );
        }
        // Inserted last so that a pod label of the same name cannot pose as the namespace.
        labels.insert(LabelKey::k8s(NAMESPACE_KEY), namespace.to_owned());
        labels
    }

    /// Parses labels as the CLI takes them (`--src-labels`): each item is `key=value` or a
    /// comma-separated list of them; a key may carry a source (`k8s:app=web`).
    ///
    /// # Errors
    ///
    /// [`LabelError`] naming the first bad item: no `=`, an empty key or source, or a key given
    /// twice.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, LabelError> {
        let mut labels = Self::new();
        for item in items.into_iter().flat_map(|list| list.split(',')) {
            let item = item.trim();
            let bad = |problem| LabelError {
                item: item.to_owned(),
                problem,
            };
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| bad(LabelProblem::MissingValue))?;
            let key = LabelKey::parse(key.trim()).map_err(bad)?;
            if labels.insert(key, value.trim().to_owned()).is_some() {
                return Err(bad(LabelProblem::Duplicate));
            }
        }
        Ok(labels)
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub fn insert(&mut self, key: LabelKey, value: String) -> Option<String> {
        self.0.insert(key, value)
    }

    /// The value of `key`.
    #[must_use]
    pub fn get(&self, key: &LabelKey) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The values of the labels with this key, whatever their source.
    pub fn values_of_key<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(label, _)| label.key == key)
            .map(|(_, value)| value.as_str())
    }

    /// The labels in order.
    pub fn iter(&self) -> impl Iterator<Item = (&LabelKey, &str)> {
        self.0.iter().map(|(key, value)| (key, value.as_str()))
    }

    /// Number of labels.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for Labels {
    type Err = LabelError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().is_empty() {
            return Ok(Self::new());
        }
        Self::parse([text])
    }
}

/// `k8s:app=web,k8s:io.kubernetes.pod.namespace=default`, which [`Labels::from_str`] reads
/// back.
impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, (key, value)) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

/// A label item that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("label {item:?}: {problem}")]
pub struct LabelError {
    /// The item as given.
    pub item: String,
    /// What is wrong with it.
    pub problem: LabelProblem,
}

/// What is wrong with a label item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LabelProblem {
    /// No `=`.
    #[error("expected key=value")]
    MissingValue,
    /// Nothing between the source's `:` and the `=`.
    #[error("empty key")]
    EmptyKey,
    /// Nothing before the `:`.
    #[error("empty source")]
    EmptySource,
    /// The key was already given.
    #[error("key given twice")]
    Duplicate,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn for_pod_adds_namespace_and_namespace_labels() {
        let labels = Labels::for_pod("prod", &map(&[("app", "web")]), &map(&[("team", "blue")]));
        assert_eq!(
            labels.to_string(),
            "k8s:app=web,k8s:io.cilium.k8s.namespace.labels.team=blue,\
             k8s:io.kubernetes.pod.namespace=prod"
        );
    }

    #[test]
    fn a_pod_label_cannot_pose_as_the_namespace() {
        let labels = Labels::for_pod("prod", &map(&[(NAMESPACE_KEY, "kube-system")]), &map(&[]));
        assert_eq!(labels.get(&LabelKey::k8s(NAMESPACE_KEY)), Some("prod"));
    }

    #[test]
    fn parses_lists_and_repeated_items_with_sources() {
        let labels = Labels::parse(["org=empire,class=deathstar", "container:x=1"]).unwrap();
        assert_eq!(
            labels.to_string(),
            "container:x=1,k8s:class=deathstar,k8s:org=empire"
        );
        assert_eq!(labels.to_string().parse::<Labels>().unwrap(), labels);
        assert_eq!("".parse::<Labels>().unwrap(), Labels::new());
    }

    #[test]
    fn parse_errors_name_the_item() {
        let err = Labels::parse(["org=empire,class"]).unwrap_err();
        assert_eq!(
            err,
            LabelError {
                item: "class".into(),
                problem: LabelProblem::MissingValue
            }
        );
        assert_eq!(err.to_string(), "label \"class\": expected key=value");
        assert_eq!(
            Labels::parse(["a=1,k8s:a=2"]).unwrap_err().problem,
            LabelProblem::Duplicate
        );
        assert_eq!(
            Labels::parse([":a=1"]).unwrap_err().problem,
            LabelProblem::EmptySource
        );
        assert_eq!(
            Labels::parse(["k8s:=1"]).unwrap_err().problem,
            LabelProblem::EmptyKey
        );
    }

    #[test]
    fn values_of_key_ignores_the_source() {
        let labels = Labels::parse(["k8s:app=a,container:app=b,k8s:other=c"]).unwrap();
        let values: Vec<_> = labels.values_of_key("app").collect();
        assert_eq!(values, ["b", "a"]);
    }
}
