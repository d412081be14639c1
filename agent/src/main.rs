//! `tanzhen`: parse the command line, set up logging, dispatch.

mod agent;
mod btf;
mod caps;
mod check;
mod cli;
mod compat;
mod config;
mod export;
mod features;
#[cfg(fuzzing)]
pub mod fuzz;
#[cfg(test)]
mod hostile;
mod kernel;
mod live;
mod loader;
mod metadata;
mod perfbuf;
mod probe;
mod process;
mod server;
mod snapshot;
#[cfg(feature = "tls")]
mod tls;
mod transport;

use std::process::ExitCode;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse_or_exit();
    match cli.command {
        Command::Run(args) => {
            // Everything passes the logger; log::set_max_level filters, so SIGHUP can change it.
            env_logger::Builder::new()
                .filter_level(log::LevelFilter::Trace)
                // aya's loader logs every relocation at debug; keep it for --log-level trace.
                .filter_module("aya", args.log_level.aya_filter())
                // The Kubernetes client's HTTP and TLS layers log every request at debug.
                .filter_module("kube_client", args.log_level.aya_filter())
                .filter_module("kube_runtime", args.log_level.aya_filter())
                .filter_module("hyper_util", args.log_level.aya_filter())
                .filter_module("rustls", args.log_level.aya_filter())
                .filter_module("tower_http", args.log_level.aya_filter())
                .format_timestamp_millis()
                .format_target(false)
                .init();
            log::set_max_level(args.log_level.into());
            match agent::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tanzhen: error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Probes => {
            check::probes();
            ExitCode::SUCCESS
        }
        Command::Config(cli::ConfigCommand::Default) => {
            use clap::CommandFactory as _;
            if let Some(run) = Cli::command().find_subcommand("run") {
                print!("{}", config::default_text(run));
            }
            ExitCode::SUCCESS
        }
        Command::Watch(args) => live::watch::main(&args),
        Command::Top(args) => live::tui::main(&args),
        Command::Check(args) => {
            env_logger::Builder::new()
                .filter_level(log::LevelFilter::Warn)
                .filter_module("aya", log::LevelFilter::Error)
                .init();
            match check::check(&args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("tanzhen: error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
