//! The blob-store contract, run against every backend: staged bytes are readable while they
//! are written, nothing is visible before commit, a commit whose bytes do not hash to the
//! digest stores nothing, and a committed blob reads back by range.

use bytes::Bytes;
use futures_util::StreamExt;
use pullgate::core::ports::{BlobStore, CommitError};
use pullgate::core::registry::reference::Digest;
use pullgate::native::store::FsBlobStore;
use pullgate::testing::MemBlobStore;

async fn read_all(store: &dyn BlobStore, digest: &Digest, start: u64, end: u64) -> Vec<u8> {
    let mut s = store
        .read(digest, start, end)
        .await
        .unwrap()
        .expect("stored");
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

async fn contract(store: &dyn BlobStore) {
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let digest = Digest::of(&data);
    let d = &digest;
    let halves = [
        Bytes::copy_from_slice(&data[..400_000]),
        Bytes::copy_from_slice(&data[400_000..]),
    ];

    // A mismatch stores nothing.
    let mut w = store.create(d, None).await.unwrap();
    w.write(vec![Bytes::from_static(b"not the blob")])
        .await
        .unwrap();
    assert!(matches!(
        w.commit().await,
        Err(CommitError::DigestMismatch { .. })
    ));
    assert_eq!(store.stat(d).await.unwrap(), None);

    // Staged bytes are readable while written, invisible until commit (the size hint is the
    // upstream's Content-Length).
    let mut w = store.create(d, Some(1_000_000)).await.unwrap();
    let tail = w.tail().expect("this backend reads writes in progress");
    w.write(vec![halves[0].clone()]).await.unwrap();
    assert_eq!(
        &tail.read_at(1000, 100).await.unwrap()[..],
        &data[1000..1100]
    );
    assert_eq!(store.stat(d).await.unwrap(), None);
    w.write(vec![halves[1].clone()]).await.unwrap();
    w.commit().await.unwrap();
    // The tail stays readable after commit (readers that joined late).
    assert_eq!(
        &tail.read_at(999_990, 10).await.unwrap()[..],
        &data[999_990..]
    );
    assert_eq!(store.stat(d).await.unwrap(), Some(1_000_000));
    assert_eq!(read_all(store, d, 0, 1_000_000).await, data);
    assert_eq!(
        read_all(store, d, 123_456, 654_321).await,
        &data[123_456..654_321]
    );

    // An aborted write leaves nothing.
    let other = Digest::of(b"abc");
    let mut w = store.create(&other, None).await.unwrap();
    w.write(vec![Bytes::from_static(b"abc")]).await.unwrap();
    w.abort().await;
    assert_eq!(store.stat(&other).await.unwrap(), None);
    assert!(store.read(&other, 0, 3).await.unwrap().is_none());

    // A size hint is only a hint: a wrong one may fail the commit, but what becomes visible
    // is exactly the bytes written, or nothing.
    let mut w = store.create(&other, Some(1)).await.unwrap();
    w.write(vec![Bytes::from_static(b"abc")]).await.unwrap();
    match w.commit().await {
        Ok(()) => {
            assert_eq!(read_all(store, &other, 0, 3).await, b"abc");
            assert!(store.delete(&other).await.unwrap());
        }
        Err(_) => assert_eq!(store.stat(&other).await.unwrap(), None),
    }
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f);
}

#[test]
fn mem_blob_store_keeps_the_contract() {
    run(contract(&MemBlobStore::default()));
}

#[test]
fn fs_blob_store_keeps_the_contract_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let store = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
        contract(&store).await;
        assert_eq!(store.total_bytes(), 1_000_000);
    });
    // Reopened: the blob is still there, and staged leftovers are gone.
    std::fs::write(dir.path().join("tmp").join("leftover"), b"x").unwrap();
    let store = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(store.total_bytes(), 1_000_000);
    assert!(!dir.path().join("tmp").join("leftover").exists());
}

/// The same digest committed twice (two fills racing, or a fill of a blob already stored)
/// counts once: usage stays exact, and eviction does not chase phantom bytes.
async fn commit_twice(store: &dyn BlobStore) {
    let data = vec![7u8; 1000];
    let d = Digest::of(&data);
    let mut first = store.create(&d, None).await.unwrap();
    let mut second = store.create(&d, None).await.unwrap();
    first.write(vec![Bytes::from(data.clone())]).await.unwrap();
    second.write(vec![Bytes::from(data.clone())]).await.unwrap();
    first.commit().await.unwrap();
    second.commit().await.unwrap();
    // And once more after the fact.
    let mut third = store.create(&d, None).await.unwrap();
    third.write(vec![Bytes::from(data.clone())]).await.unwrap();
    third.commit().await.unwrap();
    assert_eq!(store.stat(&d).await.unwrap(), Some(1000));
    assert_eq!(read_all(store, &d, 0, 1000).await, data);
    assert_eq!(store.usage().await.unwrap(), Some((1, 1000)));
    assert!(store.delete(&d).await.unwrap());
    assert_eq!(store.usage().await.unwrap(), Some((0, 0)));
}

#[test]
fn mem_blob_store_counts_a_blob_committed_twice_once() {
    run(commit_twice(&MemBlobStore::default()));
}

#[test]
fn fs_blob_store_counts_a_blob_committed_twice_once() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let store = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
        commit_twice(&store).await;
        assert_eq!(store.staging_bytes(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    });
}

#[test]
fn fs_blob_store_keeps_unrelated_blobs_when_one_is_committed_twice() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let store = FsBlobStore::open(dir.path(), 2500).unwrap();
        let a = vec![1u8; 1000];
        let b = vec![2u8; 1000];
        for data in [&a, &a, &b] {
            let mut w = store.create(&Digest::of(data), None).await.unwrap();
            w.write(vec![Bytes::from(data.clone())]).await.unwrap();
            w.commit().await.unwrap();
        }
        // 2000 bytes under a 2500 cap: no eviction pass is started at all.
        assert_eq!(store.total_bytes(), 2000);
        assert_eq!(store.stat(&Digest::of(&a)).await.unwrap(), Some(1000));
        assert_eq!(store.stat(&Digest::of(&b)).await.unwrap(), Some(1000));
    });
}

#[test]
fn fs_blob_store_evicts_committed_blobs_to_make_room_for_staged_bytes() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let store = FsBlobStore::open(dir.path(), 3000).unwrap();
        for i in 0..2u8 {
            let data = vec![i; 1000];
            let mut w = store.create(&Digest::of(&data), None).await.unwrap();
            w.write(vec![Bytes::from(data)]).await.unwrap();
            w.commit().await.unwrap();
        }
        // 2000 committed + 1500 staged > 3000: the oldest blob goes.
        let big = vec![9u8; 1500];
        let mut w = store.create(&Digest::of(&big), None).await.unwrap();
        w.write(vec![Bytes::from(big)]).await.unwrap();
        // Eviction runs on the blocking pool; give it a bounded chance to finish.
        // (A loaded machine can be slow to run it: the bound is generous.)
        for _ in 0..4000 {
            if store.total_bytes() + store.staging_bytes() <= 3000 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!((store.total_bytes(), store.staging_bytes()), (1000, 1500));
        w.commit().await.unwrap();
        assert_eq!(store.total_bytes(), 2500);
    });
}

#[test]
fn fs_blob_store_counts_staged_bytes_until_commit_or_abandon() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let store = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
        let data = vec![1u8; 500];
        let d = Digest::of(&data);
        let mut w = store.create(&d, None).await.unwrap();
        w.write(vec![Bytes::from(data.clone())]).await.unwrap();
        assert_eq!(store.staging_bytes(), 500);
        assert_eq!(store.total_bytes(), 0);
        w.commit().await.unwrap();
        assert_eq!((store.staging_bytes(), store.total_bytes()), (0, 500));
        // A writer dropped without commit or abort (its fill was cancelled) leaves nothing.
        let other = vec![2u8; 300];
        let mut w = store.create(&Digest::of(&other), None).await.unwrap();
        w.write(vec![Bytes::from(other)]).await.unwrap();
        assert_eq!(store.staging_bytes(), 300);
        drop(w);
        assert_eq!(store.staging_bytes(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    });
}

#[test]
fn fs_blob_store_rescans_usage_and_clears_staging_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![3u8; 2000];
    let d = Digest::of(&data);
    run(async {
        let store = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
        let mut w = store.create(&d, None).await.unwrap();
        w.write(vec![Bytes::from(data.clone())]).await.unwrap();
        w.commit().await.unwrap();
        // A fill in progress when the process is killed: its staging file stays behind.
        let mut w = store.create(&Digest::of(b"partial"), None).await.unwrap();
        w.write(vec![Bytes::from_static(b"part")]).await.unwrap();
        std::mem::forget(w);
    });
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        1
    );
    let store = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
    assert_eq!((store.blob_count(), store.total_bytes()), (1, 2000));
    assert_eq!(store.staging_bytes(), 0);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn fs_blob_store_evicts_over_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let store = FsBlobStore::open(dir.path(), 2500).unwrap();
        for i in 0..5u8 {
            let data = vec![i; 1000];
            let d = Digest::of(&data);
            let mut w = store.create(&d, None).await.unwrap();
            w.write(vec![Bytes::from(data)]).await.unwrap();
            w.commit().await.unwrap();
            // Eviction runs on the blocking pool; give it a bounded chance to finish.
            for _ in 0..200 {
                if store.total_bytes() <= 2500 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        assert!(store.total_bytes() <= 2500, "{}", store.total_bytes());
        // The newest blob survives.
        let newest = Digest::of(&[4u8; 1000]);
        assert_eq!(store.stat(&newest).await.unwrap(), Some(1000));
    });
}

async fn kv_contract(kv: &dyn pullgate::core::ports::KvStore) {
    for k in ["outbox/2", "outbox/1", "outboy/1", "outbox/3", "other"] {
        kv.put(k, k.as_bytes()).await.unwrap();
    }
    assert_eq!(kv.get("outbox/1").await.unwrap().unwrap(), b"outbox/1");
    assert_eq!(
        kv.list("outbox/", 10).await.unwrap(),
        ["outbox/1", "outbox/2", "outbox/3"]
    );
    assert_eq!(
        kv.list("outbox/", 2).await.unwrap(),
        ["outbox/1", "outbox/2"]
    );
    kv.delete("outbox/2").await.unwrap();
    kv.delete("absent").await.unwrap();
    assert_eq!(
        kv.list("outbox/", 10).await.unwrap(),
        ["outbox/1", "outbox/3"]
    );
    assert_eq!(kv.get("outbox/2").await.unwrap(), None);
}

#[test]
fn kv_stores_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        kv_contract(&pullgate::testing::MemKv::default()).await;
        kv_contract(&pullgate::native::store::RedbKv::open(&dir.path().join("m.redb")).unwrap())
            .await;
    });
}
