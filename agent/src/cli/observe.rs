//! `nodeseal observe`: flow verdicts from the local agent's datapath, like `hubble observe`.
//!
//! Sends one [`Request::Observe`] line on the agent's status socket and prints the
//! newline-delimited [`ObserveLine`]s it answers. Filters are applied by the agent, so a
//! narrow filter sends little over the socket.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::config::DEFAULT_STATUS_SOCKET;
use crate::observe::{HISTORY, ObserveLine, ObserveRequest, Verdict, validate_label_filter};
use crate::status::Request;

/// Longest line read from the agent (a flow with long label sets stays far below it).
const MAX_LINE: u64 = 1 << 20;
/// History shown without `--follow`, `--last` or `--since` (as `hubble observe`).
const DEFAULT_LAST: usize = 20;
/// How long the agent may take to answer the history.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(30);

/// `nodeseal observe …`.
#[derive(clap::Args, Debug)]
pub(super) struct ObserveArgs {
    /// Only flows with this verdict. Following forwarded flows turns on the datapath's trace
    /// events (a per-packet cost) while this command runs.
    #[arg(long, value_enum)]
    verdict: Option<VerdictArg>,
    /// Only flows whose source identity has this label (`key=value`, `source:key=value` or
    /// `reserved:name`; repeat: all must match).
    #[arg(long = "from-label", value_parser = label_filter)]
    from_labels: Vec<String>,
    /// Only flows whose destination identity has this label (as `--from-label`).
    #[arg(long = "to-label", value_parser = label_filter)]
    to_labels: Vec<String>,
    /// Only flows with this source or destination port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Only flows of the last DURATION from the agent's history (e.g. 30s, 5m).
    #[arg(long, value_parser = since)]
    since: Option<Duration>,
    /// Keep printing new flows until interrupted.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N matching flows of the history (default without --follow or --since:
    /// 20; the agent keeps 4096).
    #[arg(long, value_parser = last)]
    last: Option<usize>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// The agent's status socket.
    #[arg(
        long,
        visible_alias = "status-socket",
        env = "NODESEAL_STATUS_SOCKET",
        default_value = DEFAULT_STATUS_SOCKET
    )]
    socket: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum VerdictArg {
    Forwarded,
    Dropped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    /// One line per flow.
    Text,
    /// One JSON flow object per line.
    Json,
}

fn label_filter(value: &str) -> Result<String, String> {
    validate_label_filter(value)
        .map(|()| value.to_owned())
        .map_err(|e| e.to_string())
}

fn since(value: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(value)
        .map_err(|e| format!("{e}: expected a duration such as 30s, 5m or 1h"))?;
    if d.is_zero() {
        return Err("must be longer than 0".to_owned());
    }
    Ok(d)
}

fn last(value: &str) -> Result<usize, String> {
    let n: usize = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    if n == 0 || n > HISTORY {
        return Err(format!("must be between 1 and {HISTORY}"));
    }
    Ok(n)
}

impl ObserveArgs {
    fn request(&self) -> ObserveRequest {
        let last = match (self.last, self.since, self.follow) {
            (Some(n), _, _) => Some(n),
            (None, Some(_), _) => None,
            // Following from now on, like `hubble observe -f`.
            (None, None, true) => Some(0),
            (None, None, false) => Some(DEFAULT_LAST),
        };
        ObserveRequest {
            follow: self.follow,
            verdict: self.verdict.map(|v| match v {
                VerdictArg::Forwarded => Verdict::Forwarded,
                VerdictArg::Dropped => Verdict::Dropped,
            }),
            from_labels: self.from_labels.clone(),
            to_labels: self.to_labels.clone(),
            port: self.port,
            since_ms: self
                .since
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            last,
        }
    }
}

/// Runs `nodeseal observe`.
pub(super) async fn observe(args: ObserveArgs) -> Result<()> {
    let request = args.request();
    let socket = &args.socket;
    let mut stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connecting to the agent's status socket {} (is nodeseal-agent running?)",
            socket.display()
        )
    })?;
    stream
        .write_all(&Request::Observe(request.clone()).to_line())
        .await
        .context("sending the request")?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    // One flow per pass; the agent ends the stream (history) or the user interrupts (follow).
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE);
        let read = limited.read_until(b'\n', &mut line);
        let read = if request.follow {
            read.await
        } else {
            tokio::time::timeout(HISTORY_TIMEOUT, read)
                .await
                .context("the agent did not answer in time")?
        }
        .context("reading from the agent")?;
        if read == 0 {
            if request.follow {
                bail!("the agent closed the stream (it stopped?)");
            }
            return Ok(());
        }
        if line.last() != Some(&b'\n') && read as u64 >= MAX_LINE {
            bail!("the agent sent a line longer than {MAX_LINE} bytes");
        }
        let parsed: ObserveLine = match serde_json::from_slice(&line) {
            Ok(parsed) => parsed,
            // An agent from before `observe` answers every connection with its status.
            Err(_) if serde_json::from_slice::<crate::status::NodeView>(&line).is_ok() => {
                bail!("the agent at {} does not support observe", socket.display())
            }
            Err(e) => return Err(e).context("malformed line from the agent"),
        };
        let out = match parsed {
            ObserveLine::Flow(flow) => match args.output {
                OutputFormat::Text => flow.to_text(),
                OutputFormat::Json => serde_json::to_string(&flow)?,
            },
            ObserveLine::Lost { flows } => {
                eprintln!("lost {flows} flows: this client read too slowly");
                continue;
            }
            ObserveLine::Error { message } => bail!("the agent refused: {message}"),
        };
        let mut stdout = std::io::stdout().lock();
        match writeln!(stdout, "{out}").and_then(|()| stdout.flush()) {
            Ok(()) => {}
            // The reader of our output went away (`| head`): done, not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to standard output"),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Wrapper {
        #[command(flatten)]
        args: ObserveArgs,
    }

    fn parse(args: &[&str]) -> Result<ObserveArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("observe").chain(args.iter().copied()))
            .map(|w| w.args)
    }

    #[test]
    fn arguments_become_the_request() {
        let args = parse(&[
            "--verdict",
            "dropped",
            "--from-label",
            "org=alliance",
            "--to-label",
            "k8s:org=empire",
            "--to-label",
            "class=deathstar",
            "--port",
            "80",
            "--since",
            "5m",
            "-f",
            "-o",
            "json",
            "--status-socket",
            "/tmp/x.sock",
        ])
        .expect("valid");
        assert_eq!(args.output, OutputFormat::Json);
        assert_eq!(args.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(
            args.request(),
            ObserveRequest {
                follow: true,
                verdict: Some(Verdict::Dropped),
                from_labels: vec!["org=alliance".into()],
                to_labels: vec!["k8s:org=empire".into(), "class=deathstar".into()],
                port: Some(80),
                since_ms: Some(300_000),
                last: None,
            }
        );
    }

    #[test]
    fn history_defaults_like_hubble() {
        assert_eq!(
            parse(&[]).expect("valid").request().last,
            Some(DEFAULT_LAST)
        );
        assert_eq!(parse(&["-f"]).expect("valid").request().last, Some(0));
        assert_eq!(
            parse(&["--last", "7", "-f"]).expect("valid").request().last,
            Some(7)
        );
        assert_eq!(
            parse(&["--since", "30s"]).expect("valid").request().last,
            None
        );
    }

    #[test]
    fn bad_arguments_are_refused_clearly() {
        for (args, needle) in [
            (
                &["--verdict", "lost"][..],
                "possible values: forwarded, dropped",
            ),
            (&["--from-label", "org"], "expected key=value"),
            (&["--to-label", "a=b,c=d"], "expected key=value"),
            (&["--port", "0"], "0 is not in 1..=65535"),
            (&["--port", "http"], "invalid digit"),
            (&["--since", "soon"], "expected a duration"),
            (&["--since", "0s"], "longer than 0"),
            (&["--last", "0"], "between 1 and 4096"),
            (&["--last", "5000"], "between 1 and 4096"),
            (&["-o", "yaml"], "possible values: text, json"),
        ] {
            let err = parse(args).expect_err("refused").to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
