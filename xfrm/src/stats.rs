//! Kernel-wide XFRM error counters from `/proc/net/xfrm_stat` (`CONFIG_XFRM_STATISTICS`).
//!
//! Per-state counters come with each state ([`crate::StateStats`]); this is the namespace-wide
//! view that `nodeseal status` shows and that explains drops such as `XfrmInNoStates`.

use std::path::Path;

/// Errors reading `/proc/net/xfrm_stat`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatError {
    /// The file could not be read (kernel without `CONFIG_XFRM_STATISTICS`?).
    #[error("cannot read {path}")]
    Read {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `Name <whitespace> number`.
    #[error("line {line}: malformed xfrm_stat line {text:?}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

macro_rules! xfrm_stat {
    ($($field:ident => $name:literal : $doc:literal,)*) => {
        /// Every counter of `/proc/net/xfrm_stat`. Counters an older kernel does not have read
        /// as 0; counters a newer kernel adds are kept in `other`.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct XfrmStat {
            $(#[doc = $doc] pub $field: u64,)*
            /// Counters this version does not know, by kernel name.
            pub other: Vec<(String, u64)>,
        }

        impl XfrmStat {
            /// Kernel names of all known counters, in the kernel's order.
            pub const NAMES: &'static [&'static str] = &[$($name,)*];

            fn set(&mut self, name: &str, value: u64) -> bool {
                match name {
                    $($name => self.$field = value,)*
                    _ => return false,
                }
                true
            }

            /// Known counters as (kernel name, value) pairs, in the kernel's order.
            #[must_use]
            pub fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$(($name, self.$field),)*]
            }
        }
    };
}

xfrm_stat! {
    in_error => "XfrmInError": "All errors not matched by other counters (inbound)",
    in_buffer_error => "XfrmInBufferError": "No buffer available",
    in_hdr_error => "XfrmInHdrError": "Header error",
    in_no_states => "XfrmInNoStates": "No state found (wrong SPI, or address/mark mismatch)",
    in_state_proto_error => "XfrmInStateProtoError": "Transformation protocol error (e.g. bad key)",
    in_state_mode_error => "XfrmInStateModeError": "Transformation mode error",
    in_state_seq_error => "XfrmInStateSeqError": "Sequence error (replay window)",
    in_state_expired => "XfrmInStateExpired": "State has expired",
    in_state_mismatch => "XfrmInStateMismatch": "State matched but its selector did not",
    in_state_invalid => "XfrmInStateInvalid": "State is invalid",
    in_tmpl_mismatch => "XfrmInTmplMismatch": "No policy template matched the states used",
    in_no_pols => "XfrmInNoPols": "No policy for the states used",
    in_pol_block => "XfrmInPolBlock": "Policy says block",
    in_pol_error => "XfrmInPolError": "Policy error",
    out_error => "XfrmOutError": "All errors not matched by other counters (outbound)",
    out_bundle_gen_error => "XfrmOutBundleGenError": "Bundle generation error",
    out_bundle_check_error => "XfrmOutBundleCheckError": "Bundle check error",
    out_no_states => "XfrmOutNoStates": "No state found for an outbound policy",
    out_state_proto_error => "XfrmOutStateProtoError": "Transformation protocol error",
    out_state_mode_error => "XfrmOutStateModeError": "Transformation mode error",
    out_state_seq_error => "XfrmOutStateSeqError": "Sequence number overflow",
    out_state_expired => "XfrmOutStateExpired": "State has expired",
    out_pol_block => "XfrmOutPolBlock": "Policy says block",
    out_pol_dead => "XfrmOutPolDead": "Policy is dead",
    out_pol_error => "XfrmOutPolError": "Policy error",
    fwd_hdr_error => "XfrmFwdHdrError": "Forward routing of a packet not allowed",
    out_state_invalid => "XfrmOutStateInvalid": "State is invalid (perhaps expired)",
    acquire_error => "XfrmAcquireError": "State not fully acquired before use",
    out_state_dir_error => "XfrmOutStateDirError": "Outbound use of an input-only state (6.10+)",
    in_state_dir_error => "XfrmInStateDirError": "Inbound use of an output-only state (6.10+)",
    in_iptfs_error => "XfrmInIptfsError": "IP-TFS inbound error (6.14+)",
    out_no_queue_space => "XfrmOutNoQueueSpace": "No queue space for outbound (IP-TFS, 6.14+)",
}

impl XfrmStat {
    /// The default path.
    pub const PATH: &'static str = "/proc/net/xfrm_stat";

    /// Parses the file's text.
    ///
    /// # Errors
    /// [`StatError::Malformed`] for a line that is not a name and a number.
    pub fn parse(text: &str) -> Result<Self, StatError> {
        let mut stat = Self::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let parsed = match (parts.next(), parts.next(), parts.next()) {
                (Some(name), Some(value), None) => value.parse::<u64>().ok().map(|v| (name, v)),
                _ => None,
            };
            let Some((name, value)) = parsed else {
                return Err(StatError::Malformed {
                    line: i + 1,
                    text: line.to_owned(),
                });
            };
            if !stat.set(name, value) {
                stat.other.push((name.to_owned(), value));
            }
        }
        Ok(stat)
    }

    /// Reads and parses a file (normally [`XfrmStat::PATH`], which is per network namespace:
    /// read it from a thread in the namespace of interest).
    ///
    /// # Errors
    /// [`StatError::Read`] or [`StatError::Malformed`].
    pub fn read(path: impl AsRef<Path>) -> Result<Self, StatError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| StatError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_field_and_keeps_unknown_ones() {
        let mut text = String::new();
        for (i, name) in XfrmStat::NAMES.iter().enumerate() {
            text.push_str(&format!("{name:<24}\t{}\n", i + 1));
        }
        text.push_str("XfrmFutureCounter\t99\n");
        let stat = XfrmStat::parse(&text).unwrap();
        for (i, (name, value)) in stat.counters().into_iter().enumerate() {
            assert_eq!(value, i as u64 + 1, "{name}");
        }
        assert_eq!(stat.in_no_states, 4);
        assert_eq!(stat.out_no_queue_space, 32);
        assert_eq!(stat.other, vec![("XfrmFutureCounter".to_owned(), 99)]);
    }

    #[test]
    fn rejects_malformed_lines() {
        let err = XfrmStat::parse("XfrmInError 1\nXfrmInNoStates x\n").unwrap_err();
        assert!(matches!(err, StatError::Malformed { line: 2, .. }), "{err}");
        assert!(XfrmStat::parse("XfrmInError 1 2\n").is_err());
    }

    #[test]
    fn reads_this_hosts_file_if_present() {
        // The host kernel may lack CONFIG_XFRM_STATISTICS; then there is nothing to read.
        let Ok(text) = std::fs::read_to_string(XfrmStat::PATH) else {
            eprintln!("skipping: {} not present", XfrmStat::PATH);
            return;
        };
        let stat = XfrmStat::parse(&text).unwrap();
        assert!(stat.other.is_empty(), "unknown counters: {:?}", stat.other);
    }
}
