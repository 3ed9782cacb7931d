//! The `consolegate` binary: parse the command line, set up logging, load
//! the configuration and run. Exit code 64 means a bad configuration.

use std::process::ExitCode;

use clap::Parser as _;
use consolegate::cli::{Cli, Command, LogFormat};
use consolegate::config::{Config, FileConfig};
use tracing_subscriber::EnvFilter;

const EX_CONFIG: u8 = 64;

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("CONSOLEGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match FileConfig::read(&config) {
            Ok(_) => {
                let args = consolegate::cli::ServeArgs {
                    config: Some(config),
                    ..Default::default()
                };
                match Config::build(&args) {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("consolegate: invalid configuration: {e}");
                        ExitCode::from(EX_CONFIG)
                    }
                }
            }
            Err(e) => {
                eprintln!("consolegate: invalid configuration: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Doctor {
            config,
            datapath,
            allowlist,
            ktls,
        } => {
            let args = consolegate::cli::ServeArgs {
                config,
                datapath,
                allowlist,
                ktls,
                ..Default::default()
            };
            let cfg = match Config::build(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("consolegate: invalid configuration: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            let report = consolegate::control::doctor::run(cfg.datapath, cfg.allowlist, cfg.ktls);
            print!("{report}");
            if report.config_unsatisfied() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Serve(args) => {
            let cfg = match Config::build(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("consolegate: invalid configuration: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            init_logging(cfg.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("consolegate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(consolegate::app::run_reloadable(cfg, Some(*args))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "consolegate cannot start");
                    eprintln!("consolegate: {e}");
                    if e.is_config() {
                        ExitCode::from(EX_CONFIG)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            }
        }
    }
}
