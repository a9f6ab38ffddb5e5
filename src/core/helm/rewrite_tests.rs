//! Tests of the index rewriter ([`super`]): layouts Helm and other tools write, refusals,
//! path assignment, chunking.

use super::*;

const D1: &str = "515c58e5f79d8b2913a10cb400ebb6fa9c77fe813287afbacf1a0b897cd78727";
const D2: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn run(index: &str) -> Result<(String, Summary), IndexError> {
    run_split(index, 7)
}

/// Feeds `index` in pieces of `step` bytes, so lines arrive split.
fn run_split(index: &str, step: usize) -> Result<(String, Summary), IndexError> {
    let mut rw = Rewriter::new(Url::parse("https://charts.example/stable/").unwrap());
    let mut out = Vec::new();
    for piece in index.as_bytes().chunks(step) {
        rw.push(piece)?;
        while let Some(c) = rw.take_chunk() {
            out.extend(c);
        }
    }
    let (rest, summary) = rw.finish()?;
    rest.into_iter().for_each(|c| out.extend(c));
    Ok((String::from_utf8(out).unwrap(), summary))
}

/// What `helm repo index` writes (go-yaml v2: sorted keys, unindented sequences).
fn helm_index() -> String {
    format!(
        r#"apiVersion: v1
entries:
  alpine:
  - apiVersion: v2
    appVersion: 0.2.0
    created: "2024-05-01T10:00:00.000000000Z"
    description: |-
      Deploy a basic Alpine Linux pod
      urls:
      - https://evil.example/not-a-url-item.tgz
    digest: {D1}
    home: https://helm.sh/helm
    keywords:
    - alpine
    maintainers:
    - email: someone@example.com
      name: someone
    name: alpine
    sources:
    - https://github.com/helm/helm
    urls:
    - https://charts.example/stable/alpine-0.2.0.tgz
    version: 0.2.0
  - apiVersion: v2
    created: "2024-04-01T10:00:00Z"
    digest: {D2}
    name: alpine
    urls:
    - alpine-0.1.0.tgz
    version: 0.1.0
  nginx: []
generated: "2024-05-01T10:00:00Z"
"#
    )
}

#[test]
fn helm_generated_index_gets_relative_urls_and_digests() {
    let (out, s) = run(&helm_index()).unwrap();
    assert!(out.contains("    urls:\n    - alpine-0.2.0.tgz\n    version: 0.2.0\n"));
    assert!(out.contains("    - alpine-0.1.0.tgz\n"));
    // The block scalar's look-alike lines are description text, left alone.
    assert!(out.contains("      - https://evil.example/not-a-url-item.tgz\n"));
    assert!(!out.contains("https://charts.example"));
    assert_eq!(s.entries, 2);
    assert_eq!(s.passed_through, 0);
    assert_eq!(
        s.charts,
        vec![
            ChartRef {
                key: "alpine-0.1.0.tgz".into(),
                digest: parse_digest_hex(D2).unwrap(),
                url: "https://charts.example/stable/alpine-0.1.0.tgz".into(),
            },
            ChartRef {
                key: "alpine-0.2.0.tgz".into(),
                digest: parse_digest_hex(D1).unwrap(),
                url: "https://charts.example/stable/alpine-0.2.0.tgz".into(),
            },
        ]
    );
    // Only the absolute URL line changed (the relative one already resolves to pullgate).
    let input = helm_index();
    let changed: Vec<_> = input
        .lines()
        .zip(out.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(input.lines().count(), out.lines().count());
}

#[test]
fn the_result_does_not_depend_on_how_the_bytes_arrive() {
    let whole = run_split(&helm_index(), usize::MAX).unwrap().0;
    for step in [1, 2, 3, 64, 1000] {
        assert_eq!(run_split(&helm_index(), step).unwrap().0, whole);
    }
}

#[test]
fn other_layouts_are_understood() {
    // go-yaml v3 style: indented sequences, digest after urls, quoted keys and values,
    // comments, CRLF line endings, a byte-order mark, a document start.
    let index = format!(
        "\u{feff}---\r\n# mirror\r\napiVersion: \"v1\"\r\nentries:\r\n    app:\r\n        -   \"urls\":\r\n                - 'https://cdn.example/x/app-1.0.0.tgz' # primary\r\n                - \"https://mirror.example/app-1.0.0.tgz\"\r\n            name: app\r\n            'digest': \"sha256:{D1}\"\r\n        - digest: {D2}\r\n          urls: [\"https://cdn.example/x/app-2.0.0.tgz\", https://m.example/app-2.0.0.tgz]\r\n"
    );
    let (out, s) = run(&index).unwrap();
    assert!(
        out.contains("                - app-1.0.0.tgz\r\n                - app-1.0.0.tgz\r\n"),
        "{out}"
    );
    assert!(
        out.contains("          urls: [app-2.0.0.tgz, app-2.0.0.tgz]\r\n"),
        "{out}"
    );
    assert_eq!(s.charts.len(), 2);
    assert_eq!(s.charts[0].url, "https://cdn.example/x/app-1.0.0.tgz");
    assert_eq!(s.charts[1].url, "https://cdn.example/x/app-2.0.0.tgz");
}

#[test]
fn bare_dash_entries_and_empty_collections() {
    let index = format!(
        "apiVersion: v1\nentries:\n  a:\n  -\n    digest: {D1}\n    urls:\n    - https://x.example/a-1.tgz\n  -\n    urls: []\n  b: []\n  c:\n    - urls:\n      - https://x.example/c-1.tgz\n      digest: {D2}\n"
    );
    let (out, s) = run(&index).unwrap();
    assert!(out.contains("  -\n    digest: "), "{out}");
    assert!(out.contains("    - a-1.tgz\n"), "{out}");
    assert!(out.contains("      - c-1.tgz\n"), "{out}");
    assert_eq!(s.entries, 3);
    assert_eq!(s.passed_through, 1);
    let (out, s) = run("apiVersion: v1\nentries: {}\n").unwrap();
    assert_eq!(out, "apiVersion: v1\nentries: {}\n");
    assert!(s.charts.is_empty());
}

#[test]
fn entries_without_a_usable_digest_keep_upstream_urls_made_absolute() {
    let index = format!(
        "apiVersion: v1\nentries:\n  a:\n  - name: a\n    urls:\n    - charts/a-1.tgz\n    version: \"1\"\n  - digest: nothex\n    urls:\n    - https://other.example/a-2.tgz\n  - digest: {D1}\n    urls:\n    - oci://registry.example/a\n"
    );
    let (out, s) = run(&index).unwrap();
    assert!(
        out.contains("    - https://charts.example/stable/charts/a-1.tgz\n"),
        "{out}"
    );
    assert!(out.contains("    - https://other.example/a-2.tgz\n"));
    assert!(out.contains("    - oci://registry.example/a\n"));
    assert!(s.charts.is_empty());
    assert_eq!(s.passed_through, 3);
}

#[test]
fn file_name_collisions_and_odd_names_get_distinct_paths() {
    let index = format!(
        "apiVersion: v1\nentries:\n  a:\n  - digest: {D1}\n    urls:\n    - https://x.example/one/a-1.tgz\n  - digest: {D2}\n    urls:\n    - https://y.example/two/a-1.tgz\n  - digest: {D1}\n    urls:\n    - https://x.example/one/a-1.tgz\n  b:\n  - digest: {D2}\n    name: b\n    urls:\n    - https://z.example/download/\n  c:\n  - digest: {D1}\n    urls:\n    - \"https://z.example/c%20d+1.tgz\"\n"
    );
    let (out, s) = run(&index).unwrap();
    let keys: Vec<&str> = s.charts.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "0f1e2d3c4b5a6978/a-1.tgz",
            "a-1.tgz",
            "b-0f1e2d3c4b5a6978.tgz",
            "c d+1.tgz"
        ]
    );
    assert!(out.contains("    - 0f1e2d3c4b5a6978/a-1.tgz\n"));
    assert!(out.contains("    - c%20d+1.tgz\n"), "{out}");
    assert_eq!(s.entries, 5);
}

#[test]
fn unsupported_documents_are_refused_with_a_line_number() {
    let cases = [
        ("{\"apiVersion\":\"v1\",\"entries\":{}}\n", 1, "JSON"),
        (
            "<!DOCTYPE html>\n<html></html>\n",
            1,
            "unexpected top-level",
        ),
        ("entries: {}\n", 1, "apiVersion"),
        ("apiVersion: v1\nentries: {a: []}\n", 2, "block mapping"),
        ("apiVersion: v1\n---\napiVersion: v1\n", 2, "several"),
        (
            "apiVersion: v1\nentries:\n  a:\n  - urls: *u\n",
            4,
            "urls must be a list",
        ),
        (
            "apiVersion: v1\nentries:\n  a:\n  - urls:\n    - &x https://a/b.tgz\n",
            5,
            "anchors",
        ),
        (
            "apiVersion: v1\nentries:\n  a:\n  - urls:\n    - https://a/\n      b.tgz\n",
            6,
            "one line",
        ),
        (
            "apiVersion: v1\nentries:\n  a:\n    b: c\n",
            4,
            "expected a chart version",
        ),
    ];
    for (index, line, needle) in cases {
        let e = run(index).unwrap_err();
        assert_eq!(e.line, line, "{index:?}: {e}");
        assert!(e.to_string().contains(needle), "{index:?}: {e}");
    }
}

#[test]
fn huge_lines_and_entries_are_refused() {
    let mut rw = Rewriter::new(Url::parse("https://c.example/").unwrap());
    let e = rw.push(&vec![b'a'; MAX_LINE + 1]).unwrap_err();
    assert!(e.msg.contains("longer"));
    let mut index = String::from("apiVersion: v1\nentries:\n  a:\n  - description: |\n");
    let line = format!("      {}\n", "x".repeat(1000));
    while index.len() < MAX_ENTRY + 10_000 {
        index.push_str(&line);
    }
    assert!(run_split(&index, 65536).unwrap_err().msg.contains("entry"));
}

#[test]
fn output_is_cut_at_entry_boundaries_by_content() {
    let mut index = String::from("apiVersion: v1\nentries:\n  app:\n");
    for i in 0..40_000 {
        index.push_str(&format!(
            "  - description: version {i} of app with some text to make it longer\n    digest: {D1}\n    urls:\n    - https://charts.example/stable/app-{i}.tgz\n    version: 1.0.{i}\n"
        ));
    }
    let mut rw = Rewriter::new(Url::parse("https://charts.example/stable/").unwrap());
    let mut chunks = Vec::new();
    for piece in index.as_bytes().chunks(100_000) {
        rw.push(piece).unwrap();
        while let Some(c) = rw.take_chunk() {
            chunks.push(c);
        }
    }
    let (rest, s) = rw.finish().unwrap();
    chunks.extend(rest);
    assert!(chunks.len() >= 2, "{} chunks", chunks.len());
    for c in &chunks[..chunks.len() - 1] {
        assert!(c.len() >= CHUNK_MIN && c.len() <= CHUNK_MAX + MAX_ENTRY);
        assert!(c.ends_with(b"\n"));
    }
    assert_eq!(s.charts.len(), 40_000);
    assert!(s.charts.windows(2).all(|w| w[0].key < w[1].key));
}
