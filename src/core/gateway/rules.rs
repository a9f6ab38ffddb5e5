//! Matching normalised events against `[[rule]]`s and rendering a rule's image template. Pure.
//!
//! Branch and tag patterns are path globs ([`path_glob_match`]: `*` stops at `/`, `**` crosses
//! it, as in GitHub Actions filters); repository patterns keep [`glob_match`], where `*` also
//! matches `/`.

use crate::core::gateway::config::RuleConfig;
use crate::core::gateway::event::SourceEvent;
use crate::core::glob::{glob_match, path_glob_match};

fn any_match(patterns: &[String], text: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, text))
}

/// Branch and tag patterns: `*` stops at `/`, `**` crosses it.
fn any_ref_match(patterns: &[String], text: &str) -> bool {
    patterns.iter().any(|p| path_glob_match(p, text))
}

/// The repository's short name (`owner/name`) from a clone or web URL.
pub fn repo_short_name(url: &str) -> String {
    let trimmed = url.trim_end_matches('/').trim_end_matches(".git");
    let path = match trimmed.split_once("://") {
        // https://host/owner/name: drop the host.
        Some((_, rest)) => rest.split_once('/').map(|(_, p)| p).unwrap_or(rest),
        // git@host:owner/name
        None => trimmed.split_once(':').map(|(_, p)| p).unwrap_or(trimmed),
    };
    path.to_string()
}

/// Does `rule` (for `webhook`) match `event`?
pub fn rule_matches(rule: &RuleConfig, webhook: &str, event: &SourceEvent) -> bool {
    if rule.webhook != webhook {
        return false;
    }
    let on = |k: &str| rule.on.is_empty() || rule.on.iter().any(|o| o == k);
    let repo_ok = |repo: &str| {
        rule.repositories.is_empty()
            || any_match(&rule.repositories, repo)
            || any_match(&rule.repositories, &repo_short_name(repo))
    };
    match event {
        SourceEvent::Push {
            branch, repository, ..
        } => {
            on("push")
                && repo_ok(repository)
                && (rule.branches.is_empty() || any_ref_match(&rule.branches, branch))
        }
        SourceEvent::Tag {
            tag, repository, ..
        } => {
            on("tag")
                && repo_ok(repository)
                && (rule.tags.is_empty() || any_ref_match(&rule.tags, tag))
        }
        SourceEvent::Artifact { .. } => false,
    }
}

/// Makes a value safe inside an image tag: `[A-Za-z0-9_.-]`, other characters become `-`.
fn tag_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Renders an image template for a push or tag event.
pub fn render_image(template: &str, event: &SourceEvent) -> String {
    let (branch, tag, commit, repo) = match event {
        SourceEvent::Push {
            branch,
            commit,
            repository,
            ..
        } => (branch.as_str(), "", commit.as_str(), repository.as_str()),
        SourceEvent::Tag {
            tag,
            commit,
            repository,
            ..
        } => ("", tag.as_str(), commit.as_str(), repository.as_str()),
        SourceEvent::Artifact { .. } => ("", "", "", ""),
    };
    let ref_name = if tag.is_empty() { branch } else { tag };
    let short: String = commit.chars().take(7).collect();
    template
        .replace("{branch}", &tag_safe(branch))
        .replace("{tag}", &tag_safe(tag))
        .replace("{ref_name}", &tag_safe(ref_name))
        .replace("{short_sha}", &short)
        .replace("{sha}", commit)
        .replace("{repo}", &repo_short_name(repo))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(branches: &[&str], tags: &[&str], on: &[&str]) -> RuleConfig {
        RuleConfig {
            webhook: "app".into(),
            on: on.iter().map(|s| s.to_string()).collect(),
            branches: branches.iter().map(|s| s.to_string()).collect(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
            repositories: vec![],
            stage: None,
            target: None,
            image: None,
        }
    }

    fn push(branch: &str) -> SourceEvent {
        SourceEvent::Push {
            repository: "https://github.com/acme/app.git".into(),
            git_ref: format!("refs/heads/{branch}"),
            branch: branch.into(),
            commit: "0123456789abcdef".into(),
            author: "a".into(),
        }
    }

    #[test]
    fn globs() {
        for (p, t, m) in [
            ("main", "main", true),
            ("release/*", "release/1.2", true),
            ("release/*", "release", false),
            ("v*", "v1.0.0", true),
            ("v?", "v1", true),
            ("v?", "v10", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ] {
            assert_eq!(glob_match(p, t), m, "{p} {t}");
        }
    }

    #[test]
    fn rules_match_branches_tags_and_kinds() {
        let r = rule(&["main", "release/*"], &["v*"], &["push", "tag"]);
        assert!(rule_matches(&r, "app", &push("main")));
        assert!(rule_matches(&r, "app", &push("release/2")));
        assert!(!rule_matches(&r, "app", &push("feature/x")));
        assert!(!rule_matches(&r, "other", &push("main")));
        let tag = SourceEvent::Tag {
            repository: "r".into(),
            git_ref: "refs/tags/v1".into(),
            tag: "v1".into(),
            commit: "c".into(),
            author: "a".into(),
        };
        assert!(rule_matches(&r, "app", &tag));
        assert!(!rule_matches(&rule(&["main"], &[], &["push"]), "app", &tag));
        // Branch and tag patterns stop at `/` as GitHub Actions filters do; `**` crosses it.
        assert!(!rule_matches(&r, "app", &push("release/2/hotfix")));
        let deep = rule(&["release/**"], &[], &["push"]);
        assert!(rule_matches(&deep, "app", &push("release/2/hotfix")));
        let star = rule(&["*"], &[], &["push"]);
        assert!(rule_matches(&star, "app", &push("main")));
        assert!(!rule_matches(&star, "app", &push("feature/x")));
        let mut repo_rule = rule(&[], &[], &[]);
        repo_rule.repositories = vec!["acme/*".into()];
        assert!(rule_matches(&repo_rule, "app", &push("any")));
        // Repository patterns keep `*` across `/`.
        repo_rule.repositories = vec!["*".into()];
        assert!(rule_matches(&repo_rule, "app", &push("any")));
        repo_rule.repositories = vec!["other/*".into()];
        assert!(!rule_matches(&repo_rule, "app", &push("any")));
    }

    #[test]
    fn image_templates() {
        assert_eq!(
            render_image(
                "registry.example.com/acme/app:{branch}-{short_sha}",
                &push("release/1.2")
            ),
            "registry.example.com/acme/app:release-1.2-0123456"
        );
        assert_eq!(
            render_image("r/{repo}:{sha}", &push("main")),
            "r/acme/app:0123456789abcdef"
        );
        assert_eq!(repo_short_name("git@host:acme/app.git"), "acme/app");
        assert_eq!(repo_short_name("acme/app"), "acme/app");
        assert_eq!(repo_short_name("https://gitlab.com/g/sub/p"), "g/sub/p");
    }
}
