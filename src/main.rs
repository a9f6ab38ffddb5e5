//! The `pullgate` command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "pullgate",
    version,
    about = "Edge registry cache and build-trigger gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry cache (native host, embedded storage).
    Serve {
        /// Address to listen on [default: 127.0.0.1:5000].
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Cache directory [default: ./pullgate-data].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Upstream registry, HOST=URL (repeatable); docker.io=URL replaces Docker Hub's URL.
        #[arg(long, value_name = "HOST=URL")]
        upstream: Vec<String>,
        /// Configuration file (TOML; the schema every host shares).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            listen,
            data_dir,
            upstream,
            config,
        } => pullgate::native::serve(pullgate::native::ServeOptions {
            listen,
            data_dir,
            upstreams: upstream,
            config,
        }),
    };
    if let Err(e) = result {
        eprintln!("pullgate: {e}");
        std::process::exit(2);
    }
}
