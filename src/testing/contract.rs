//! The store contracts, as functions any store's tests call with their backend: the blob
//! store's ([`blob_store_contract`], [`blob_store_counts_a_blob_committed_twice_once`]) and
//! the key-value store's ([`kv_store_contract`]). They panic on the first broken promise, so
//! a backend passes by returning. Every call of a [`BlobStore`] method is in this file, so a
//! change of the port's signature is adapted here once.

use crate::core::ports::{BlobStore, CommitError, KvStore};
use crate::core::registry::reference::Digest;
use bytes::Bytes;
use futures_util::StreamExt;

/// Whether a blob store reads a write in progress (`BlobWriter::tail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// Staged bytes are readable while written (the file store, `MemBlobStore`).
    Readable,
    /// No tail (R2, `MemBlobStore::without_tail`): readers wait for the commit.
    Absent,
}

/// Reads `start..end` of a committed blob; panics when it is absent or a chunk fails.
pub async fn read_all(store: &dyn BlobStore, digest: &Digest, start: u64, end: u64) -> Vec<u8> {
    let mut stream = match store.read(digest, start, end).await {
        Ok(Some(stream)) => stream,
        Ok(None) => panic!("{digest} is not stored"),
        Err(e) => panic!("read {digest}: {e:?}"),
    };
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(e) => panic!("reading {digest}: {e:?}"),
        }
    }
    out
}

async fn stat(store: &dyn BlobStore, digest: &Digest) -> Option<u64> {
    match store.stat(digest).await {
        Ok(size) => size,
        Err(e) => panic!("stat {digest}: {e:?}"),
    }
}

async fn put(store: &dyn BlobStore, data: &[u8]) -> Digest {
    let digest = Digest::of(data);
    let mut w = store
        .create(&digest, Some(data.len() as u64))
        .await
        .unwrap();
    w.write(vec![Bytes::copy_from_slice(data)]).await.unwrap();
    w.commit().await.unwrap();
    digest
}

/// The blob-store contract: a commit whose bytes do not hash to the digest stores nothing;
/// staged bytes are readable while they are written (with [`Tail::Readable`]) and invisible
/// until commit; a committed blob has its size and reads back whole and by range; an aborted
/// write leaves nothing.
pub async fn blob_store_contract(store: &dyn BlobStore, tail: Tail) {
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
    assert_eq!(stat(store, d).await, None);

    // Staged bytes are readable while written, invisible until commit (the size hint is the
    // upstream's Content-Length).
    let mut w = store.create(d, Some(1_000_000)).await.unwrap();
    let reader = w.tail();
    assert_eq!(
        reader.is_some(),
        tail == Tail::Readable,
        "this backend's tail is not {tail:?}"
    );
    w.write(vec![halves[0].clone()]).await.unwrap();
    if let Some(reader) = &reader {
        assert_eq!(
            &reader.read_at(1000, 100).await.unwrap()[..],
            &data[1000..1100]
        );
    }
    assert_eq!(stat(store, d).await, None);
    w.write(vec![halves[1].clone()]).await.unwrap();
    w.commit().await.unwrap();
    // The tail stays readable after commit (readers that joined late).
    if let Some(reader) = &reader {
        assert_eq!(
            &reader.read_at(999_990, 10).await.unwrap()[..],
            &data[999_990..]
        );
    }
    assert_eq!(stat(store, d).await, Some(1_000_000));
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
    assert_eq!(stat(store, &other).await, None);
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
        Err(_) => assert_eq!(stat(store, &other).await, None),
    }
}

/// The same digest committed twice (two fills racing, or a fill of a blob already stored)
/// counts once: usage stays exact, and eviction does not chase phantom bytes. Deleting it
/// empties the store. The store must start empty.
pub async fn blob_store_counts_a_blob_committed_twice_once(store: &dyn BlobStore) {
    let data = vec![7u8; 1000];
    let d = Digest::of(&data);
    let mut first = store.create(&d, Some(1000)).await.unwrap();
    let mut second = store.create(&d, Some(1000)).await.unwrap();
    first.write(vec![Bytes::from(data.clone())]).await.unwrap();
    second.write(vec![Bytes::from(data.clone())]).await.unwrap();
    first.commit().await.unwrap();
    second.commit().await.unwrap();
    // And once more after the fact.
    put(store, &data).await;
    assert_eq!(stat(store, &d).await, Some(1000));
    assert_eq!(read_all(store, &d, 0, 1000).await, data);
    assert_eq!(store.usage().await.unwrap(), Some((1, 1000)));
    assert!(store.delete(&d).await.unwrap());
    assert_eq!(store.usage().await.unwrap(), Some((0, 0)));
}

/// Commits `data` under its digest (test set-up for store-specific tests).
pub async fn put_blob(store: &dyn BlobStore, data: &[u8]) -> Digest {
    put(store, data).await
}

/// The key-value contract: values read back, `list` returns the keys under a prefix in order
/// and at most `limit` of them, and deleting a key (present or not) removes it.
pub async fn kv_store_contract(kv: &dyn KvStore) {
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
