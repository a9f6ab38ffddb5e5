#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/seeds/<target>/.

The seeds are realistic inputs in the layouts `src/fuzzing.rs` describes: real request paths
of docker/containerd/skopeo, real `WWW-Authenticate` challenges, webhook deliveries shaped like
each provider's documented payloads (signed with `fuzzing::WEBHOOK_SECRET`), a Helm index as
`helm repo index` writes it, and the README's configuration blocks. Run it from anywhere; it
replaces fuzz/seeds/. `scripts/fuzz.sh` starts every run from these plus the committed corpus.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEEDS = os.path.join(HERE, "seeds")
SECRET = b"fuzz-secret"  # pullgate::fuzzing::WEBHOOK_SECRET
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
PROVIDERS = ["github", "gitlab", "gitea", "forgejo", "bitbucket", "generic-hmac",
             "distribution", "harbor"]

D1 = "sha256:" + hashlib.sha256(b"layer one").hexdigest()
D2 = "sha256:" + hashlib.sha256(b"manifest").hexdigest()
SHA1 = "a3c1f0e9b2d4c6e8f0a1b3c5d7e9f1a3b5c7d9e1"


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def route_seeds():
    paths = [
        ("GET", "/v2/"),
        ("GET", "/v2"),
        ("HEAD", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/v2/library/alpine/manifests/latest"),
        ("HEAD", "/v2/library/alpine/manifests/3.20"),
        ("GET", "/v2/alpine/manifests/latest?ns=docker.io"),
        ("GET", "/v2/nginx/blobs/" + D1),
        ("GET", f"/v2/library/nginx/manifests/{D2}?ns=index.docker.io"),
        ("GET", "/v2/ghcr.io/owner/app/manifests/v1.2.3"),
        ("GET", "/v2/owner/app/manifests/main?ns=ghcr.io"),
        ("GET", "/v2/localhost:5000/team/private/blobs/" + D1),
        ("GET", "/v2/registry.k8s.io/pause/manifests/3.10"),
        ("GET", "/v2/library/alpine/tags/list?n=10&last=3.19"),
        ("GET", "/v2/library/alpine/tags/list?last=v1%2Brc&n=2"),
        ("GET", "/v2/a/b/c/d/e/manifests/x?ns=registry.example"),
        ("GET", "/v2/alias.example:8443/x/manifests/y"),
        ("GET", "/v2/_catalog"),
        ("POST", "/v2/library/alpine/blobs/uploads/"),
        ("PUT", "/v2/library/alpine/manifests/latest"),
        ("DELETE", "/v2/library/alpine/blobs/" + D1),
        ("GET", "/v2/evil.example/x/manifests/latest"),
        ("GET", "/v2/x/manifests/latest?ns=evil.example%00"),
        ("GET", "/v2/my-app__x/sub.dir/blobs/uploads/../" + D1),
        ("GET", "/charts/bitnami/index.yaml"),
    ]
    for i, (m, p) in enumerate(paths):
        write("route", f"seed-{i:02}", bytes([METHODS.index(m)]) + p.encode())


def reference_seeds():
    for i, s in enumerate([
        "library/alpine", "alpine", "ghcr.io/owner/app", "a/b/c/d", "my-app__x/sub.dir",
        "a--b", "latest", "v1.2.3-rc.1", "_hidden", "A" * 128, "sha256:" + "a" * 64, D1,
        "sha512:" + "b" * 128, "sha256:" + "A" * 64, "../etc/passwd", "x" * 256,
    ]):
        write("reference", f"seed-{i:02}", s)


def challenge_seeds():
    for i, s in enumerate([
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"',
        'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:o/a:pull"',
        'bearer realm="https://quay.io/v2/auth", service="quay.io"',
        'Bearer realm="http://127.0.0.1:5001/token",service="local",scope="repository:a:pull,push"',
        'Bearer realm="https://login.example/t\\"x",error="invalid_token"',
        'Basic realm="Registry Realm"',
        'Bearer realm=https://unquoted.example/token,service=x',
        'Negotiate YII=',
        '{"token":"abc","expires_in":300}',
        '{"access_token":"xyz","issued_at":"2026-01-01T00:00:00Z"}',
    ]):
        write("challenge", f"seed-{i:02}", s)


def range_seeds():
    cases = [(1000, "bytes=0-99"), (1000, "bytes=500-"), (1000, "bytes=-100"),
             (1000, "bytes=999-2000"), (0, "bytes=-1"), (10, "bytes=0-0,5-6"),
             (1 << 30, "bytes= 1048576 - 2097151 "), (5, "items=0-1"), (5, "bytes=3-1")]
    for i, (size, h) in enumerate(cases):
        # The target shifts the size right by (first byte % 64): keep that byte 0.
        write("range", f"seed-{i:02}", struct.pack("<Q", size << 8) + h.encode())


def sign_hex(body):
    return hmac.new(SECRET, body, hashlib.sha256).hexdigest()


def delivery(provider, headers, body):
    head = "".join(f"{k}: {v}\n" for k, v in headers)
    return bytes([PROVIDERS.index(provider)]) + head.encode() + b"\n" + body


def webhook_seeds():
    gh_push = json.dumps({
        "ref": "refs/heads/main", "before": "0" * 40, "after": SHA1,
        "repository": {"id": 1, "name": "app", "full_name": "acme/app",
                       "clone_url": "https://github.com/acme/app.git",
                       "html_url": "https://github.com/acme/app"},
        "pusher": {"name": "ana", "email": "ana@example.com"},
        "sender": {"login": "ana"}, "created": False, "deleted": False, "forced": False,
        "head_commit": {"id": SHA1, "message": "Fix the build", "timestamp":
                        "2026-11-27T09:00:00Z"},
        "commits": [{"id": SHA1, "message": "Fix the build", "added": [], "removed": [],
                     "modified": ["src/main.rs"]}],
    }, indent=2).encode()
    gh_tag = gh_push.replace(b"refs/heads/main", b"refs/tags/v1.4.0")
    gh_del = json.dumps({"ref": "refs/heads/old", "after": "0" * 40, "deleted": True,
                         "repository": {"clone_url": "https://github.com/acme/app.git"}}).encode()
    gl_push = json.dumps({
        "object_kind": "push", "event_name": "push", "before": "0" * 40, "after": SHA1,
        "ref": "refs/heads/release/2.0", "checkout_sha": SHA1, "user_name": "Bo",
        "user_username": "bo", "project_id": 15,
        "project": {"id": 15, "name": "app", "web_url": "https://gitlab.example/acme/app",
                    "git_http_url": "https://gitlab.example/acme/app.git",
                    "path_with_namespace": "acme/app"},
        "commits": [{"id": SHA1, "message": "bump"}], "total_commits_count": 1,
        "repository": {"name": "app", "git_http_url": "https://gitlab.example/acme/app.git"},
    }).encode()
    gl_tag = gl_push.replace(b'"push"', b'"tag_push"').replace(b"refs/heads/release/2.0",
                                                              b"refs/tags/v2.0.0")
    gitea = json.dumps({
        "ref": "refs/heads/main", "before": "0" * 40, "after": SHA1,
        "compare_url": "https://gitea.example/acme/app/compare/x...y",
        "repository": {"full_name": "acme/app", "clone_url": "https://gitea.example/acme/app.git",
                       "html_url": "https://gitea.example/acme/app"},
        "pusher": {"login": "cy", "username": "cy"}, "sender": {"login": "cy"},
    }).encode()
    bb = json.dumps({
        "actor": {"display_name": "Cy", "nickname": "cy"},
        "repository": {"full_name": "acme/app", "links": {"html": {
            "href": "https://bitbucket.org/acme/app"}}},
        "push": {"changes": [
            {"new": {"type": "branch", "name": "main", "target": {"hash": SHA1}},
             "old": {"type": "branch", "name": "main", "target": {"hash": "1" * 40}}},
            {"new": {"type": "tag", "name": "v3", "target": {"hash": SHA1}}, "old": None},
            {"new": None, "old": {"type": "branch", "name": "gone"}},
        ]},
    }).encode()
    generic = json.dumps({"kind": "push", "repository": "https://git.example/acme/app.git",
                          "git_ref": "refs/heads/main", "branch": "main", "commit": SHA1,
                          "author": "ci"}).encode()
    dist = json.dumps({"events": [
        {"id": "e1", "timestamp": "2026-11-27T09:00:00Z", "action": "push",
         "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1234,
                    "digest": D2, "length": 1234, "repository": "acme/app",
                    "url": "https://reg.example/v2/acme/app/manifests/" + D2, "tag": "main-a3c1f0e"},
         "request": {"id": "r1", "addr": "10.0.0.5:1234", "host": "reg.example:5000",
                     "method": "PUT", "useragent": "skopeo"},
         "actor": {"name": "ci"}, "source": {"addr": "reg:5000", "instanceID": "i"}},
        {"action": "push", "target": {"mediaType": "application/octet-stream", "digest": D1,
                                      "repository": "acme/app"}},
        {"action": "pull", "target": {"mediaType":
                                      "application/vnd.docker.distribution.manifest.v2+json",
                                      "digest": D2, "repository": "acme/app"}},
    ]}).encode()
    harbor = json.dumps({
        "type": "PUSH_ARTIFACT", "occur_at": 1700000000, "operator": "admin",
        "event_data": {"resources": [{"digest": D2, "tag": "v1",
                                      "resource_url": "harbor.example/library/app:v1"}],
                       "repository": {"date_created": 1700000000, "name": "app",
                                      "namespace": "library", "repo_full_name": "library/app",
                                      "repo_type": "private"}},
    }).encode()
    # GitLab's newer signing: Standard Webhooks (id.timestamp.body, base64 HMAC).
    ts = "1700000000"
    sw = base64.b64encode(hmac.new(SECRET, b"msg_1." + ts.encode() + b"." + gl_push,
                                   hashlib.sha256).digest()).decode()
    seeds = [
        ("github", [("X-GitHub-Event", "push"), ("X-GitHub-Delivery", "72d3162e-cc78"),
                    ("X-Hub-Signature-256", "sha256=" + sign_hex(gh_push)),
                    ("Content-Type", "application/json")], gh_push),
        ("github", [("X-GitHub-Event", "push"),
                    ("X-Hub-Signature-256", "sha256=" + sign_hex(gh_tag))], gh_tag),
        ("github", [("X-GitHub-Event", "push"), ("X-Hub-Signature-256", "sha256=00")], gh_del),
        ("github", [("X-GitHub-Event", "ping")], b'{"zen":"Keep it logically awesome.","hook_id":1}'),
        ("github", [("X-GitHub-Event", "create")], b'{"ref":"v1","ref_type":"tag"}'),
        ("gitlab", [("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "fuzz-secret"),
                    ("X-Gitlab-Event-UUID", "u-1")], gl_push),
        ("gitlab", [("X-Gitlab-Event", "Tag Push Hook"), ("webhook-id", "msg_1"),
                    ("webhook-timestamp", ts), ("webhook-signature", "v1," + sw)], gl_tag),
        ("gitea", [("X-Gitea-Event", "push"), ("X-Gitea-Delivery", "d-1"),
                   ("X-Gitea-Signature", sign_hex(gitea))], gitea),
        ("forgejo", [("X-Forgejo-Event", "push"), ("X-Forgejo-Signature", sign_hex(gitea))],
         gitea),
        ("bitbucket", [("X-Event-Key", "repo:push"), ("X-Request-UUID", "b-1"),
                       ("X-Hub-Signature", "sha256=" + sign_hex(bb))], bb),
        ("generic-hmac", [("X-Signature", "sha256=" + sign_hex(generic)),
                          ("X-Delivery", "g-1")], generic),
        ("distribution", [("Authorization", "fuzz-secret")], dist),
        ("harbor", [("Authorization", "fuzz-secret")], harbor),
        ("github", [], b"not json"),
        ("bitbucket", [("X-Event-Key", "repo:push")], b'{"push":{"changes":{}}}'),
    ]
    for i, (p, h, b) in enumerate(seeds):
        write("webhook", f"seed-{i:02}-{p}", delivery(p, h, b))


def helm_seeds():
    def entry(name, version, digest, url, indent=True):
        dash = "  - " if indent else "  - "
        return (f"{dash}annotations:\n      category: Infrastructure\n      licenses: Apache-2.0\n"
                f"    apiVersion: v2\n    appVersion: {version}\n"
                f"    created: \"2024-05-01T10:00:00.123456789Z\"\n"
                f"    dependencies:\n    - name: common\n      repository: oci://registry.example/charts\n"
                f"      tags:\n      - bitnami-common\n      version: 2.x.x\n"
                f"    description: |-\n      Chart {name} packages an application for Kubernetes.\n"
                f"      urls:\n      - this line is description text, not a URL\n"
                f"    digest: {digest}\n    home: https://example.com/charts/{name}\n"
                f"    keywords:\n    - generated\n    maintainers:\n    - name: Pullgate Tests\n"
                f"      url: https://example.com/maintainers\n    name: {name}\n"
                f"    urls:\n    - {url}\n    version: {version}\n")
    h = lambda s: hashlib.sha256(s.encode()).hexdigest()
    big = "apiVersion: v1\nentries:\n"
    for name in ["nginx", "redis", "postgresql"]:
        big += f"  {name}:\n"
        for v in ["1.0.0", "1.1.0"]:
            big += entry(name, v, h(name + v),
                         f"https://charts.example/stable/{name}-{v}.tgz")
    big += 'generated: "2024-05-01T10:00:00.123456789Z"\n'
    seeds = [
        big,
        # go-yaml v3 style: sequences not indented, relative and flow URLs, quoted keys.
        "apiVersion: v1\nentries:\n  app:\n  - name: app\n    version: 0.1.0\n"
        f"    \"digest\": {h('app')}\n    urls: [app-0.1.0.tgz, 'https://mirror.example/app-0.1.0.tgz']\n"
        "  other:\n  - name: other\n    version: 2.0.0\n    urls:\n    - charts/other%20x-2.0.0.tgz\n"
        "generated: 2024-01-01T00:00:00Z\n",
        # No digest: passed through. Duplicate file names with different digests.
        "apiVersion: v1\nentries:\n  a:\n  - name: a\n    urls:\n    - https://x.example/a.tgz\n"
        f"  b:\n  - digest: {h('b1')}\n    urls:\n    - https://x.example/one/c.tgz\n"
        f"  - digest: {h('b2')}\n    urls:\n    - https://x.example/two/c.tgz\n"
        f"  - digest: {h('b3')}\n    urls:\n    - https://x.example/\n",
        "---\napiVersion: v1\nentries: {}\n...\n",
        "<html><body>Not Found</body></html>\n",
        '{"apiVersion":"v1","entries":{}}\n',
        f"apiVersion: v1\nentries:\n  x:\n  - digest: &d {h('x')}\n    urls: *u\n",
    ]
    for i, s in enumerate(seeds):
        write("helm_index", f"seed-{i:02}", bytes([0]) + s.encode())
        write("helm_index", f"seed-{i:02}-split7", bytes([7]) + s.encode())


def config_seeds():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    n = 0
    for b in blocks:
        if "[[registry]]" in b or "[host." in b:
            continue  # client configuration (podman, containerd), not pullgate's
        write("config", f"readme-{n:02}", b)
        n += 1
    write("config", "all-readme-blocks", "\n".join(
        b for b in blocks if "[[registry]]" not in b and "[host." not in b))
    write("config", "local-upstream",
          'listen = "127.0.0.1:0"\ndata_dir = "/tmp/x"\nbuiltin_upstreams = false\n'
          '[cache]\ntag_ttl = "0s"\nmax_stale = "250ms"\nupstream_timeout = "1s"\n'
          '[[upstream]]\nhost = "localhost:5000"\nurl = "http://127.0.0.1:5000"\ndefault = true\n')
    write("config", "helm", '[[helm]]\nname = "stable"\nurl = "https://charts.example/stable/"\n'
                            '[[helm]]\nname = "b"\nurl = "http://127.0.0.1:8080"\n')
    write("config", "bad-size", '[cache]\nmax_size = "18446744073709551615TB"\n')
    write("config", "bad-duration", '[cache]\ntag_ttl = "99999999999999999999d"\n')


def main():
    shutil.rmtree(SEEDS, ignore_errors=True)
    route_seeds()
    reference_seeds()
    challenge_seeds()
    range_seeds()
    webhook_seeds()
    helm_seeds()
    config_seeds()


if __name__ == "__main__":
    main()
