//! The `pullgate` command line.
//!
//! Every `serve` flag can come from a `PULLGATE_*` environment variable (the flag wins).
//! Exit codes: 0 success; 1 a runtime failure or an invalid configuration (`check-config`);
//! 2 a usage error (clap's).

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
        #[arg(long, value_name = "ADDR", env = "PULLGATE_LISTEN")]
        listen: Option<String>,
        /// Cache directory [default: ./pullgate-data].
        #[arg(long, value_name = "DIR", env = "PULLGATE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Upstream registry, HOST=URL (repeatable); docker.io=URL replaces Docker Hub's URL.
        /// In the environment, several are separated by commas.
        #[arg(
            long,
            value_name = "HOST=URL",
            env = "PULLGATE_UPSTREAM",
            value_delimiter = ','
        )]
        upstream: Vec<String>,
        /// Configuration file (TOML; the schema every host shares).
        #[arg(long, value_name = "FILE", env = "PULLGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Serving threads [default: `[server] workers`, else the available cores].
        #[arg(long, value_name = "N", env = "PULLGATE_WORKERS")]
        workers: Option<usize>,
        /// On SIGTERM/SIGINT, how long in-flight work gets once the listener closes
        /// [default: 25s, or `[server] drain`].
        #[arg(long, value_name = "DURATION", env = "PULLGATE_DRAIN")]
        drain: Option<String>,
        /// TLS certificate chain (PEM), with --tls-key [default: `[tls] cert`]. Reloaded on
        /// SIGHUP and when the file changes.
        #[arg(long, value_name = "FILE", env = "PULLGATE_TLS_CERT")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM), with --tls-cert [default: `[tls] key`].
        #[arg(long, value_name = "FILE", env = "PULLGATE_TLS_KEY")]
        tls_key: Option<PathBuf>,
    },
    /// Check a configuration file: every problem with its key path and line; exit 0 when
    /// valid, 1 otherwise. Secret references are checked for form, not read.
    CheckConfig {
        /// The configuration file.
        #[arg(value_name = "FILE", env = "PULLGATE_CONFIG")]
        file: PathBuf,
    },
    /// Pre-warm a cache: pull images (index, platforms' manifests, configs, layers) through a
    /// running pullgate (`--server`) or into the local cache, printing each step.
    Warm {
        /// Images, as clients name them: `[host/]repository[:tag][@digest]`.
        #[arg(value_name = "REF", required = true)]
        images: Vec<String>,
        /// `os/arch[/variant]` to warm from a multi-platform index (repeatable) [default: all].
        #[arg(long = "platform", value_name = "PLATFORM")]
        platforms: Vec<String>,
        /// A running pullgate's URL (e.g. http://127.0.0.1:5000) [default: the local cache].
        #[arg(long, value_name = "URL", env = "PULLGATE_SERVER")]
        server: Option<String>,
        /// User name for `--server` (Basic); the password is read from `PULLGATE_PASSWORD`.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Local cache directory (without `--server`) [default: as `serve`].
        #[arg(long, value_name = "DIR", env = "PULLGATE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Upstream registry, HOST=URL (without `--server`), as `serve` takes it.
        #[arg(
            long,
            value_name = "HOST=URL",
            env = "PULLGATE_UPSTREAM",
            value_delimiter = ','
        )]
        upstream: Vec<String>,
        /// Configuration file (without `--server`), as `serve` takes it.
        #[arg(long, value_name = "FILE", env = "PULLGATE_CONFIG")]
        config: Option<PathBuf>,
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
            drain,
            workers,
            tls_cert,
            tls_key,
        } => pullgate::native::serve(pullgate::native::ServeOptions {
            listen,
            data_dir,
            upstreams: upstream,
            config,
            drain,
            workers,
            tls_cert,
            tls_key,
        }),
        Command::CheckConfig { file } => check_config(&file),
        Command::Warm {
            images,
            platforms,
            server,
            user,
            data_dir,
            upstream,
            config,
        } => warm(images, platforms, server, user, data_dir, upstream, config),
        Command::HashPassword => hash_password(),
    };
    if let Err(e) = result {
        eprintln!("pullgate: {e}");
        std::process::exit(1);
    }
}

/// `pullgate check-config FILE`: one line per problem on stderr, `FILE:LINE:COLUMN: …`.
fn check_config(file: &std::path::Path) -> Result<(), String> {
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let problems = pullgate::native::check::check_config_text(&text);
    if problems.is_empty() {
        println!("{}: ok", file.display());
        return Ok(());
    }
    for p in &problems {
        match p.at {
            Some((line, column)) => eprint!("{}:{line}:{column}: ", file.display()),
            None => eprint!("{}: ", file.display()),
        }
        if p.path.is_empty() {
            eprintln!("{}", p.message);
        } else {
            eprintln!("{}: {}", p.path, p.message);
        }
    }
    Err(format!(
        "{} problem(s) in {}",
        problems.len(),
        file.display()
    ))
}

fn warm(
    images: Vec<String>,
    platforms: Vec<String>,
    server: Option<String>,
    user: Option<String>,
    data_dir: Option<PathBuf>,
    upstreams: Vec<String>,
    config: Option<PathBuf>,
) -> Result<(), String> {
    let credentials = match user {
        Some(user) => {
            let password = std::env::var("PULLGATE_PASSWORD")
                .map_err(|_| "--user needs the password in PULLGATE_PASSWORD".to_string())?;
            Some((user, password))
        }
        None => None,
    };
    pullgate::native::warm::run(pullgate::native::warm::WarmOptions {
        images,
        platforms,
        server,
        credentials,
        local: pullgate::native::ServeOptions {
            listen: None,
            data_dir,
            upstreams,
            config,
            drain: None,
            workers: None,
            tls_cert: None,
            tls_key: None,
        },
    })
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
