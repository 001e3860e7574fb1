//! The `kadmq` binary: parse the command line, set up logging, run.

use anyhow::Context;
use clap::Parser;
use kadmq::cli::{cluster_status, Cli, ClusterCommand, Command};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One readable line (with causes), not a backtrace.
            eprintln!("kadmq: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config => {
            print!("{}", kadmq::config::DEFAULT_CONFIG_TOML);
            Ok(())
        }
        Command::Keygen { out, force } => {
            if out.exists() && !force {
                anyhow::bail!(
                    "{} exists; pass --force to replace it (every node must then get the new key)",
                    out.display()
                );
            }
            kadmq_dht::driver::write_cluster_key(&out, &kadmq_dht::driver::generate_cluster_key())?;
            println!("wrote cluster key to {}", out.display());
            Ok(())
        }
        Command::Id { data_dir, p2p_listen } => {
            kadmq::storage::prepare_data_dir(&data_dir)?;
            let keypair = kadmq_dht::driver::load_or_generate_keypair(&kadmq::cli::node_key_dir(&data_dir))?;
            let peer_id = keypair.public().to_peer_id();
            match p2p_listen {
                Some(addr) => println!("{}", addr.with(kadmq_dht::driver::multiaddr::Protocol::P2p(peer_id))),
                None => println!("{peer_id}"),
            }
            Ok(())
        }
        Command::Cluster { command: ClusterCommand::Status { http } } => {
            print!("{}", cluster_status::render(&cluster_status::fetch(&http)?));
            Ok(())
        }
        Command::Start(args) => {
            let config = args.resolve()?;
            let filter = std::env::var("RUST_LOG").ok().unwrap_or_else(|| config.log.clone());
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::try_new(&filter).context("invalid log filter")?)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .init();
            // 0: one per core (the documented default; not tokio's, which
            // would also read TOKIO_WORKER_THREADS).
            let threads = match config.threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            };
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(threads);
            let runtime = runtime.enable_all().build().context("cannot start the async runtime")?;
            runtime.block_on(kadmq::run(config, shutdown_signal())).map_err(anyhow::Error::from)
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
