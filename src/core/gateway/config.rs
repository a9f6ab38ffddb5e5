//! The gateway's configuration: `[[webhook]]` receivers, `[[target]]` build systems and event
//! sinks, `[[rule]]` matchers, `[[stage]]` targets and `[chain]`, `[gateway]` limits and the
//! admin token. Same TOML and same keys on every host; secrets are references resolved by the
//! host, held as [`Secret`]s.

use crate::core::config::value::{
    parse_duration_ms, parse_size, refuse_credentials, ConfigError, Secret, SecretResolver,
};
use serde::Deserialize;
use url::Url;

/// `[[webhook]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `POST /hooks/<name>`.
    pub name: String,
    /// `github`, `gitea`, `forgejo`, `gitlab`, `bitbucket`, `generic-hmac`, `distribution`,
    /// `harbor`.
    pub provider: String,
    /// Reference to the shared secret (HMAC key, token, or expected header value).
    pub secret: String,
    /// `distribution`: the header carrying the secret (default `Authorization`).
    pub header: Option<String>,
}

/// `[[target]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Name rules and stages refer to.
    pub name: String,
    /// `github-dispatch`, `github-workflow`, `gitlab-pipeline`, `cloudevents`, `http`.
    pub kind: String,
    /// Endpoint.
    pub url: String,
    /// Reference to the token (GitHub token, GitLab trigger token, bearer for cloudevents).
    pub token: Option<String>,
    /// Reference to the HMAC key for `http` targets (`X-Pullgate-Signature`).
    pub secret: Option<String>,
    /// `github-workflow` / `gitlab-pipeline`: the ref to run on (default: the event's branch).
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// A PEM file of private CA certificates trusted for this target's URL, in addition to the
    /// system store and the bundled roots. Native only.
    pub ca_file: Option<String>,
}

/// `[[rule]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Webhook name this rule listens to.
    pub webhook: String,
    /// Event kinds: `push`, `tag`.
    #[serde(default)]
    pub on: Vec<String>,
    /// Branch globs: `*` stops at `/`, `**` crosses it (as GitHub Actions filters).
    #[serde(default)]
    pub branches: Vec<String>,
    /// Tag globs, as `branches`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Repository globs (URL or `owner/name`); empty matches all.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Stage the run starts at (default: the chain's first).
    pub stage: Option<String>,
    /// Target for that stage (default: the `[[stage]]` entry's).
    pub target: Option<String>,
    /// Image template: `{branch}`, `{tag}`, `{ref_name}`, `{sha}`, `{short_sha}`, `{repo}`.
    pub image: Option<String>,
}

/// `[[stage]]`: which target runs a stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Stage name (one of `[chain] stages`).
    pub name: String,
    /// Target name.
    pub target: String,
}

/// `[chain]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// Stage order.
    #[serde(default)]
    pub stages: Vec<String>,
    /// A `cloudevents` target that receives the run's CDEvents.
    pub events: Option<String>,
    /// Platforms `distribute` pre-warms from an index (`os/arch`); empty: all.
    #[serde(default)]
    pub platforms: Vec<String>,
}

/// `[gateway]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Reference to the admin token for `/chain/…` reads and replays.
    pub admin_token: Option<String>,
    /// Reference to the key that derives per-run callback tokens (default: the admin token).
    pub run_secret: Option<String>,
    /// Largest webhook body read (default `25MiB`).
    pub max_body: Option<String>,
    /// How long a delivery id is remembered for dedup (default `72h`). Applies to senders
    /// that sign a timestamp (GitLab's `webhook-signature`); kept at least twice
    /// `timestamp_tolerance`, so a record never expires while its delivery is still accepted.
    pub dedup_window: Option<String>,
    /// How long the sha256 of a delivery's body is remembered, for senders that sign no
    /// timestamp (GitHub, Gitea, Forgejo, Bitbucket, generic-hmac, GitLab's plain token,
    /// registry notifications): a captured delivery replayed with a fresh delivery id inside
    /// this window is a duplicate (default `30d`; never shorter than `dedup_window`).
    pub replay_window: Option<String>,
    /// Webhook bodies held in memory at once per instance; a delivery beyond it is answered
    /// 503 with `Retry-After` before its body is read (default 8).
    pub max_inflight_bodies: Option<u32>,
    /// Accepted clock skew for signed timestamps (GitLab `webhook-timestamp`; default `5m`).
    pub timestamp_tolerance: Option<String>,
    /// Delivery attempts before the dead-letter record (default 8).
    pub max_attempts: Option<u32>,
    /// First retry delay; doubles each attempt, with jitter, up to `retry_max` (default `2s`).
    pub retry_base: Option<String>,
    /// Longest retry delay (default `10m`).
    pub retry_max: Option<String>,
    /// The URL clients reach pullgate at, for callback links (default none: relative paths).
    pub public_url: Option<String>,
}

/// Providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// GitHub.
    GitHub,
    /// Gitea.
    Gitea,
    /// Forgejo.
    Forgejo,
    /// GitLab.
    GitLab,
    /// Bitbucket Cloud.
    Bitbucket,
    /// `X-Signature: sha256=<hex>`.
    GenericHmac,
    /// distribution's notification envelope.
    Distribution,
    /// Harbor's webhook.
    Harbor,
}

/// Target kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// `repository_dispatch`.
    GitHubDispatch,
    /// `workflow_dispatch`.
    GitHubWorkflow,
    /// GitLab pipeline trigger.
    GitLabPipeline,
    /// CloudEvents 1.0 (binary mode) carrying CDEvents.
    CloudEvents,
    /// JSON, signed with `X-Pullgate-Signature`.
    Http,
}

/// A resolved webhook.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Name.
    pub name: String,
    /// Provider.
    pub provider: Provider,
    /// Secret.
    pub secret: Secret,
    /// Header name for `distribution`.
    pub header: String,
}

/// A resolved target.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: TargetKind,
    /// Endpoint.
    pub url: Url,
    /// Token.
    pub token: Option<Secret>,
    /// HMAC key.
    pub secret: Option<Secret>,
    /// Ref override.
    pub git_ref: Option<String>,
    /// `ca_file`: the private CA its deliveries carry.
    pub ca: Option<crate::core::ports::TrustedCa>,
}

/// Resolved gateway settings.
#[derive(Debug, Clone, Default)]
pub struct GatewaySettings {
    /// Receivers.
    pub webhooks: Vec<Webhook>,
    /// Targets.
    pub targets: Vec<Target>,
    /// Rules.
    pub rules: Vec<RuleConfig>,
    /// Stage → target.
    pub stage_targets: Vec<StageConfig>,
    /// Chain.
    pub chain: ChainConfig,
    /// Admin token.
    pub admin_token: Option<Secret>,
    /// Run-token key.
    pub run_secret: Option<Secret>,
    /// Body cap.
    pub max_body: u64,
    /// Dedup window for delivery ids, ms.
    pub dedup_window_ms: u64,
    /// Dedup window for body hashes (senders without a signed timestamp), ms.
    pub replay_window_ms: u64,
    /// Webhook bodies in memory at once.
    pub max_inflight_bodies: u32,
    /// Timestamp tolerance, ms.
    pub timestamp_tolerance_ms: u64,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// First retry delay, ms.
    pub retry_base_ms: u64,
    /// Longest retry delay, ms.
    pub retry_max_ms: u64,
    /// Public URL.
    pub public_url: Option<String>,
}

impl GatewaySettings {
    /// The webhook named `name`.
    pub fn webhook(&self, name: &str) -> Option<&Webhook> {
        self.webhooks.iter().find(|w| w.name == name)
    }
    /// The target named `name`.
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }
    /// The target configured for a stage.
    pub fn stage_target(&self, stage: &str) -> Option<&str> {
        self.stage_targets
            .iter()
            .find(|s| s.name == stage)
            .map(|s| s.target.as_str())
    }
}

fn provider(s: &str) -> Result<Provider, ConfigError> {
    Ok(match s {
        "github" => Provider::GitHub,
        "gitea" => Provider::Gitea,
        "forgejo" => Provider::Forgejo,
        "gitlab" => Provider::GitLab,
        "bitbucket" => Provider::Bitbucket,
        "generic-hmac" => Provider::GenericHmac,
        "distribution" => Provider::Distribution,
        "harbor" => Provider::Harbor,
        other => {
            return Err(ConfigError(format!(
                "webhook provider {other:?} is not known"
            )))
        }
    })
}

fn target_kind(s: &str) -> Result<TargetKind, ConfigError> {
    Ok(match s {
        "github-dispatch" => TargetKind::GitHubDispatch,
        "github-workflow" => TargetKind::GitHubWorkflow,
        "gitlab-pipeline" => TargetKind::GitLabPipeline,
        "cloudevents" => TargetKind::CloudEvents,
        "http" => TargetKind::Http,
        other => return Err(ConfigError(format!("target kind {other:?} is not known"))),
    })
}

fn secret(r: &dyn SecretResolver, what: &str, reference: &str) -> Result<Secret, ConfigError> {
    if !reference.contains(':') {
        return Err(ConfigError(format!(
            "{what} must be a secret reference such as \"env:NAME\", not a literal"
        )));
    }
    r.resolve(reference)
}

/// The parts of the configuration file the gateway reads.
pub struct GatewayInput<'a> {
    /// `[[webhook]]`.
    pub webhooks: &'a [WebhookConfig],
    /// `[[target]]`.
    pub targets: &'a [TargetConfig],
    /// `[[rule]]`.
    pub rules: &'a [RuleConfig],
    /// `[[stage]]`.
    pub stages: &'a [StageConfig],
    /// `[chain]`.
    pub chain: &'a ChainConfig,
    /// `[gateway]`.
    pub gateway: &'a GatewayConfig,
}

/// Resolves and cross-checks the gateway configuration.
pub fn resolve(
    input: GatewayInput<'_>,
    r: &dyn SecretResolver,
) -> Result<GatewaySettings, ConfigError> {
    let g = input.gateway;
    let webhooks = resolve_webhooks(input.webhooks, r)?;
    let targets = resolve_targets(input.targets, r)?;
    check_references(&input, &webhooks, &targets)?;
    let admin_token = g
        .admin_token
        .as_deref()
        .map(|x| secret(r, "gateway admin_token", x))
        .transpose()?;
    let run_secret = match g.run_secret.as_deref() {
        Some(x) => Some(secret(r, "gateway run_secret", x)?),
        None => admin_token.clone(),
    };
    if !input.rules.is_empty() && run_secret.is_none() {
        return Err(ConfigError("[gateway] needs run_secret or admin_token when rules are configured (it keys the per-run callback tokens)".into()));
    }
    let dur = |v: &Option<String>, d: &str| parse_duration_ms(v.as_deref().unwrap_or(d));
    let dedup_window_ms = dur(&g.dedup_window, "72h")?;
    Ok(GatewaySettings {
        webhooks,
        targets,
        rules: input.rules.to_vec(),
        stage_targets: input.stages.to_vec(),
        chain: input.chain.clone(),
        admin_token,
        run_secret,
        max_body: parse_size(g.max_body.as_deref().unwrap_or("25MiB"))?,
        dedup_window_ms,
        replay_window_ms: dur(&g.replay_window, "30d")?.max(dedup_window_ms),
        max_inflight_bodies: g.max_inflight_bodies.unwrap_or(8).max(1),
        timestamp_tolerance_ms: dur(&g.timestamp_tolerance, "5m")?,
        max_attempts: g.max_attempts.unwrap_or(8).max(1),
        retry_base_ms: dur(&g.retry_base, "2s")?,
        retry_max_ms: dur(&g.retry_max, "10m")?,
        public_url: g
            .public_url
            .clone()
            .map(|u| u.trim_end_matches('/').to_string()),
    })
}

/// `[[webhook]]` entries: names `[A-Za-z0-9_-]+` and unique, providers known, secrets
/// resolved.
fn resolve_webhooks(
    input: &[WebhookConfig],
    r: &dyn SecretResolver,
) -> Result<Vec<Webhook>, ConfigError> {
    let mut webhooks = Vec::new();
    for w in input {
        if w.name.is_empty()
            || !w
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError(format!(
                "webhook name {:?} must be [A-Za-z0-9_-]+",
                w.name
            )));
        }
        if webhooks.iter().any(|x: &Webhook| x.name == w.name) {
            return Err(ConfigError(format!(
                "webhook {:?} is configured twice",
                w.name
            )));
        }
        webhooks.push(Webhook {
            name: w.name.clone(),
            provider: provider(&w.provider)?,
            secret: secret(r, &format!("webhook {} secret", w.name), &w.secret)?,
            header: w
                .header
                .clone()
                .unwrap_or_else(|| "authorization".into())
                .to_ascii_lowercase(),
        });
    }
    Ok(webhooks)
}

/// `[[target]]` entries: an http(s) URL, a known kind, and the token or key the kind needs.
fn resolve_targets(
    input: &[TargetConfig],
    r: &dyn SecretResolver,
) -> Result<Vec<Target>, ConfigError> {
    let mut targets = Vec::new();
    for t in input {
        let url =
            Url::parse(&t.url).map_err(|e| ConfigError(format!("target {}: url: {e}", t.name)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError(format!(
                "target {}: url must be http(s)",
                t.name
            )));
        }
        refuse_credentials(&format!("target {}", t.name), &url)?;
        let kind = target_kind(&t.kind)?;
        let token = t
            .token
            .as_deref()
            .map(|x| secret(r, &format!("target {} token", t.name), x))
            .transpose()?;
        let key = t
            .secret
            .as_deref()
            .map(|x| secret(r, &format!("target {} secret", t.name), x))
            .transpose()?;
        if matches!(
            kind,
            TargetKind::GitHubDispatch | TargetKind::GitHubWorkflow | TargetKind::GitLabPipeline
        ) && token.is_none()
        {
            return Err(ConfigError(format!(
                "target {}: kind {} needs a token",
                t.name, t.kind
            )));
        }
        if kind == TargetKind::Http && key.is_none() {
            return Err(ConfigError(format!(
                "target {}: kind http needs a secret to sign with",
                t.name
            )));
        }
        targets.push(Target {
            name: t.name.clone(),
            kind,
            url,
            token,
            secret: key,
            git_ref: t.git_ref.clone(),
            ca: crate::core::registry::config::parse_ca_file(
                &format!("target {}", t.name),
                t.ca_file.as_deref(),
            )?,
        });
    }
    Ok(targets)
}

/// Rules, `[[stage]]` entries and `[chain] events` name only configured webhooks, targets
/// and stages.
fn check_references(
    input: &GatewayInput<'_>,
    webhooks: &[Webhook],
    targets: &[Target],
) -> Result<(), ConfigError> {
    let chain = input.chain;
    let known_target = |name: &str| targets.iter().any(|t: &Target| t.name == name);
    for rule in input.rules {
        check_rule(rule, webhooks, chain, &known_target)?;
    }
    for s in input.stages {
        if !known_target(&s.target) {
            return Err(ConfigError(format!(
                "stage {}: target {:?} is not configured",
                s.name, s.target
            )));
        }
    }
    if let Some(e) = &chain.events {
        match targets.iter().find(|t| &t.name == e) {
            Some(t) if t.kind == TargetKind::CloudEvents => {}
            _ => {
                return Err(ConfigError(format!(
                    "[chain] events: {e:?} must name a cloudevents target"
                )))
            }
        }
    }
    Ok(())
}

/// One rule names a configured webhook, target and stage, and known event kinds.
fn check_rule(
    rule: &RuleConfig,
    webhooks: &[Webhook],
    chain: &ChainConfig,
    known_target: &dyn Fn(&str) -> bool,
) -> Result<(), ConfigError> {
    if !webhooks.iter().any(|w| w.name == rule.webhook) {
        return Err(ConfigError(format!(
            "rule: webhook {:?} is not configured",
            rule.webhook
        )));
    }
    if let Some(t) = &rule.target {
        if !known_target(t) {
            return Err(ConfigError(format!("rule: target {t:?} is not configured")));
        }
    }
    if let Some(s) = &rule.stage {
        if !chain.stages.contains(s) {
            return Err(ConfigError(format!(
                "rule: stage {s:?} is not in [chain] stages"
            )));
        }
    }
    for on in &rule.on {
        if !matches!(on.as_str(), "push" | "tag") {
            return Err(ConfigError(format!(
                "rule: on = {on:?}: use \"push\" or \"tag\""
            )));
        }
    }
    Ok(())
}
