//! The threat model names the test that proves each claim (`test:<name>` in
//! `threat-model/README.md`); this check fails when a named test no longer exists, so a claim
//! cannot outlive its proof.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

const DOCUMENT: &str = "threat-model/README.md";
/// Where tests live; `target/` and hidden directories are never searched.
const SOURCE_DIRS: &[&str] = &[
    "agent",
    "bpf",
    "keymgr",
    "policy",
    "spiffe-bridge",
    "store",
    "tests",
    "xfrm",
    "xtask",
];

/// The test names the threat model cites, and those of them no `fn` in the workspace defines.
pub fn check(root: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let document =
        fs::read_to_string(root.join(DOCUMENT)).with_context(|| format!("reading {DOCUMENT}"))?;
    let cited = cited_tests(&document);
    let mut sources = String::new();
    for dir in SOURCE_DIRS {
        collect_rust(&root.join(dir), &mut sources)?;
    }
    let missing = cited
        .iter()
        .filter(|name| !sources.contains(&format!("fn {name}(")))
        .cloned()
        .collect();
    Ok((cited, missing))
}

/// Every `` `test:<name>` `` in `text`, in order, without duplicates.
fn cited_tests(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for piece in text.split("`test:").skip(1) {
        let Some((name, _)) = piece.split_once('`') else {
            continue;
        };
        let name = name.trim().to_owned();
        let identifier = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if identifier && !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

fn collect_rust(dir: &Path, out: &mut String) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name
            .as_deref()
            .is_some_and(|n| n == "target" || n.starts_with('.'))
        {
            continue;
        }
        if path.is_dir() {
            collect_rust(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&fs::read_to_string(&path).unwrap_or_default());
            out.push('\n');
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cites_are_read_once_each_in_order() {
        let text = "a `test:first_one`, `test:second` and `test:first_one` again; `not:this`, \
                    `test:<placeholder>`";
        assert_eq!(cited_tests(text), ["first_one", "second"]);
    }

    #[test]
    fn every_test_the_threat_model_cites_exists() {
        let root = crate::workspace_root();
        let (cited, missing) = check(&root).expect("check");
        assert!(cited.len() > 10, "{cited:?}");
        assert!(missing.is_empty(), "cited but not defined: {missing:?}");
        // A name that is not a test is reported.
        let dir = std::env::temp_dir().join(format!("nodeseal-tm-{}", std::process::id()));
        fs::create_dir_all(dir.join("threat-model")).expect("dir");
        fs::write(dir.join(DOCUMENT), "`test:no_such_test_anywhere`").expect("doc");
        let (_, missing) = check(&dir).expect("check");
        assert_eq!(missing, ["no_such_test_anywhere"]);
        let _ = fs::remove_dir_all(&dir);
    }
}
