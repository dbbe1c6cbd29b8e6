//! What the apiserver itself counts: `apiserver_request_total` from its `/metrics`, so that a
//! test or benchmark can say how many requests a client made without trusting the client.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use kube::Client;

/// Requests the apiserver has served so far on each of `resources` (plural names, e.g.
/// `nodes`), every verb but `WATCH` (a watch is one long request whose events are not counted
/// here), summed over codes, groups and scopes.
///
/// # Errors
/// If `/metrics` cannot be read (the client needs `get` on the non-resource URL; admin has it).
pub async fn non_watch_requests(
    client: &Client,
    resources: &[&str],
) -> Result<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .context("building the /metrics request")?;
    let text = client
        .request_text(request)
        .await
        .context("reading the apiserver's /metrics")?;
    Ok(count_non_watch(&text, resources))
}

fn count_non_watch(metrics: &str, resources: &[&str]) -> BTreeMap<String, f64> {
    let mut by_resource = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        if labels.contains("verb=\"WATCH\"") {
            continue;
        }
        let Some(resource) = labels
            .split(',')
            .find_map(|l| l.strip_prefix("resource=\""))
            .map(|r| r.trim_end_matches('"'))
        else {
            continue;
        };
        if resources.contains(&resource) {
            *by_resource.entry(resource.to_owned()).or_insert(0.0) +=
                value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    by_resource
}

#[cfg(test)]
mod tests {
    use super::count_non_watch;

    #[test]
    fn counts_every_verb_but_watch_of_the_named_resources() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="200",component="apiserver",group="",resource="nodes",scope="cluster",subresource="",verb="LIST",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",group="",resource="nodes",scope="cluster",subresource="",verb="WATCH",version="v1"} 7
apiserver_request_total{code="201",component="apiserver",group="",resource="configmaps",scope="namespace",subresource="",verb="POST",version="v1"} 2
apiserver_request_total{code="200",component="apiserver",group="",resource="pods",scope="namespace",subresource="",verb="GET",version="v1"} 9
apiserver_request_total{code="200",component="apiserver",group="",resource="nodes",scope="resource",subresource="",verb="GET",version="v1"} 1.5e+01
"#;
        let counts = count_non_watch(text, &["nodes", "configmaps"]);
        assert_eq!(counts.get("nodes"), Some(&18.0));
        assert_eq!(counts.get("configmaps"), Some(&2.0));
        assert_eq!(counts.get("pods"), None);
    }
}
