//! The `prompt-radar` binary: parses the command line and runs one verb (see `cli`).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROMPT_RADAR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours on a terminal only: a log file or a supervisor's journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = cli::Cli::parse_args();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        // `prompt-radar accounts | head`: the reader has what it wanted.
        Err(e) if stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prompt-radar: error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<bool> {
    use cli::Command;
    let command = match cli.command {
        Command::Reindex(args) => return cli::reindex::run(args),
        Command::Eval(args) => return cli::eval::run(args),
        Command::BenchEmbed(args) => return cli::bench::run(args),
        other => other,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command {
            Command::Serve(args) => cli::serve::run(args).await.map(|()| true),
            Command::Check(args) => cli::client::check(args).await,
            Command::Accounts(args) => cli::client::accounts(args).await.map(|()| true),
            Command::Campaigns(args) => cli::client::campaigns(args).await.map(|()| true),
            Command::Search(args) => cli::client::search(args).await.map(|()| true),
            Command::Allow(args) => cli::client::allow(args).await.map(|()| true),
            Command::Stats(args) => cli::client::stats(args).await.map(|()| true),
            Command::Reindex(_) | Command::Eval(_) | Command::BenchEmbed(_) => {
                unreachable!("offline verbs return above")
            }
        }
    })
}

/// An error and its causes on one line, `: `-separated, leaving out a cause whose text is already
/// shown: many error types (redb's, hyper's, some of ours) put their source's message in their
/// own, and anyhow's `{:#}` would print it twice ("lock: lock", "tcp connect error: tcp connect
/// error: …").
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<tonic::Status>() {
            Some(status) => cli::client::status_text(status),
            None => cause.to_string(),
        };
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// True when the verb failed writing its output because the reader went away (a broken pipe).
/// Only the error itself (or the context around it) counts, not a cause deeper down: a gRPC
/// status whose transport broke is the server going away, and must still be reported.
fn stdout_closed(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

#[cfg(test)]
mod tests {
    use super::one_line;

    /// An error that shows its source in its own message and also returns it as the source.
    #[derive(Debug)]
    struct Wrapper(std::io::Error);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "tcp connect error: {}", self.0)
        }
    }

    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_lines_name_each_cause_once() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(Wrapper(refused())).context("cannot connect to http://x:1");
        assert_eq!(
            format!("{e:#}"),
            "cannot connect to http://x:1: tcp connect error: refused: refused"
        );
        assert_eq!(
            one_line(&e),
            "cannot connect to http://x:1: tcp connect error: refused"
        );
        let e = anyhow::Error::new(refused()).context("cannot read in.jsonl");
        assert_eq!(one_line(&e), "cannot read in.jsonl: refused");
    }

    #[test]
    fn only_a_broken_pipe_of_the_output_itself_ends_quietly() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(super::stdout_closed(&anyhow::Error::new(pipe())));
        assert!(super::stdout_closed(
            &anyhow::Error::new(pipe()).context("cannot write stdout")
        ));
        assert!(!super::stdout_closed(&anyhow::Error::new(
            std::io::Error::from(std::io::ErrorKind::StorageFull)
        )));
        // The server's connection breaking is a status with the pipe as its source: reported.
        let status = tonic::Status::from_error(Box::new(pipe()));
        assert!(!super::stdout_closed(
            &anyhow::Error::new(status).context("CheckStream")
        ));
    }

    #[test]
    fn error_lines_name_a_grpc_status_by_its_code() {
        let e = anyhow::Error::new(tonic::Status::not_found("id: no allow-list entry 42"));
        assert_eq!(one_line(&e), "NOT_FOUND: id: no allow-list entry 42");
        let e = anyhow::Error::new(tonic::Status::resource_exhausted("")).context("GetAccount");
        assert_eq!(one_line(&e), "GetAccount: RESOURCE_EXHAUSTED");
    }
}
