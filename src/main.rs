//! The `prompt-radar` binary: parses the command line and runs one verb (see `cli`).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROMPT_RADAR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("prompt-radar: error: {e:#}");
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
            Command::Reindex(_) | Command::Eval(_) | Command::BenchEmbed(_) => {
                unreachable!("offline verbs return above")
            }
        }
    })
}
