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
        /// Serving threads [default: `[server] workers`, else the available cores].
        #[arg(long, value_name = "N")]
        workers: Option<usize>,
    },
    /// Read a password on standard input and print its argon2id hash for `[[identity]]`.
    HashPassword,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            listen,
            data_dir,
            upstream,
            config,
            workers,
        } => pullgate::native::serve(pullgate::native::ServeOptions {
            listen,
            data_dir,
            upstreams: upstream,
            config,
            workers,
        }),
        Command::HashPassword => hash_password(),
    };
    if let Err(e) = result {
        eprintln!("pullgate: {e}");
        std::process::exit(2);
    }
}

fn hash_password() -> Result<(), String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("reading the password: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err("an empty password was given".into());
    }
    println!("{}", pullgate::native::hash_password(password)?);
    Ok(())
}
