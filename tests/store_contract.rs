//! The store contracts (`pullgate::testing::contract`), run against every backend that runs
//! here: the in-memory stores and the native file store and redb. The blob contract: staged
//! bytes are readable while they are written, nothing is visible before commit, a commit whose
//! bytes do not hash to the digest stores nothing, and a committed blob reads back by range.
//! Then the file store's own promises: usage, eviction, recovery at startup.

use bytes::Bytes;
use pullgate::core::ports::BlobStore;
use pullgate::core::registry::reference::Digest;
use pullgate::native::store::{FsBlobStore, RedbKv};
use pullgate::testing::contract::blob_store_counts_a_blob_committed_twice_once as commit_twice;
use pullgate::testing::{
    blob_store_contract as contract, kv_store_contract, run_local as run, MemBlobStore, MemKv, Tail,
};

#[test]
fn mem_blob_store_keeps_the_contract() {
    run(contract(&MemBlobStore::default(), Tail::Readable));
}

/// A store without a tail (like R2) keeps the rest of the contract.
#[test]
fn mem_blob_store_without_tail_keeps_the_contract() {
    run(async {
        contract(&MemBlobStore::without_tail(), Tail::Absent).await;
        commit_twice(&MemBlobStore::without_tail()).await;
    });
}

#[test]
fn fs_blob_store_keeps_the_contract_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let store = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
        contract(&store, Tail::Readable).await;
        assert_eq!(store.total_bytes(), 1_000_000);
    });
    // Reopened: the blob is still there, and staged leftovers are gone.
    std::fs::write(dir.path().join("tmp").join("leftover"), b"x").unwrap();
    let store = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(store.total_bytes(), 1_000_000);
    assert!(!dir.path().join("tmp").join("leftover").exists());
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

#[test]
fn kv_stores_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        kv_store_contract(&MemKv::default()).await;
        kv_store_contract(&RedbKv::open(&dir.path().join("m.redb")).unwrap()).await;
    });
}
