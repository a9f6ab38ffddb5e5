//! `WorkerKv`: the core's key-value port over a Workers KV namespace, with manifests by digest
//! kept in the R2 bucket instead.
//!
//! Tag records and tag-list pages are small, written rarely (at most once per tag TTL) and read
//! everywhere: KV, replicated to every location, suits them. Manifests by digest are immutable
//! and must be there as soon as a tag record that names them is read; R2 is strongly
//! consistent, so they go to R2 under the same key (`manifest/sha256:…`). Nothing outside this
//! file knows about the split.
//!
//! Manifests by digest are content addressed and verified before the core stores them, so
//! reads ask this location's colo tier ([`ColoCache`]) before R2, and a manifest written or
//! read from R2 is copied into it. The core reads a manifest only for a request it entitles
//! (or before its own link check decides), exactly as it would read R2.

use crate::core::ports::{KvStore, StoreError};
use crate::worker::colo::ColoCache;
use std::rc::Rc;
use worker::{Bucket, KvStore as KvNamespace};

/// Key prefix of the records kept in R2 (see [`crate::core::registry::keys::manifest`]).
const R2_PREFIX: &str = "manifest/";

/// The key-value port over a KV namespace (and the R2 bucket for manifests).
pub struct WorkerKv {
    kv: KvNamespace,
    bucket: Bucket,
    colo: Rc<ColoCache>,
}

impl WorkerKv {
    /// Wraps the bindings; manifest reads consult `colo` first.
    pub fn new(kv: KvNamespace, bucket: Bucket, colo: Rc<ColoCache>) -> WorkerKv {
        WorkerKv { kv, bucket, colo }
    }
}

fn kv_err(what: &str, key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("KV {what} {key}: {e}"))
}

fn r2_err(what: &str, key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("R2 {what} {key}: {e}"))
}

fn in_r2(key: &str) -> bool {
    key.starts_with(R2_PREFIX)
}

impl WorkerKv {
    async fn list_kv(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut cursor = None;
        while out.len() < limit {
            let mut req = self
                .kv
                .list()
                .prefix(prefix.to_string())
                .limit((limit - out.len()).min(1000) as u64);
            if let Some(c) = cursor.take() {
                req = req.cursor(c);
            }
            let page = req.execute().await.map_err(|e| kv_err("list", prefix, e))?;
            out.extend(page.keys.into_iter().map(|k| k.name));
            match page.cursor {
                Some(c) if !page.list_complete && !c.is_empty() => cursor = Some(c),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn list_r2(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut cursor = None;
        while out.len() < limit {
            let mut req = self
                .bucket
                .list()
                .prefix(prefix.to_string())
                .limit((limit - out.len()).min(1000) as u32);
            if let Some(c) = cursor.take() {
                req = req.cursor(c);
            }
            let page = req.execute().await.map_err(|e| r2_err("list", prefix, e))?;
            out.extend(page.objects().into_iter().map(|o| o.key()));
            match page.cursor() {
                Some(c) if page.truncated() => cursor = Some(c),
                _ => break,
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait(?Send)]
impl KvStore for WorkerKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if in_r2(key) {
            if let Some(bytes) = self.colo.bytes(key).await {
                return Ok(Some(bytes));
            }
            self.colo.note_r2();
            self.colo.tally().r2_read();
            let Some(obj) = self
                .bucket
                .get(key)
                .execute()
                .await
                .map_err(|e| r2_err("get", key, e))?
            else {
                return Ok(None);
            };
            let Some(body) = obj.body() else {
                return Ok(None);
            };
            let bytes = body.bytes().await.map_err(|e| r2_err("read", key, e))?;
            self.colo.put_bytes(key, &bytes);
            return Ok(Some(bytes));
        }
        self.kv
            .get(key)
            .bytes()
            .await
            .map_err(|e| kv_err("get", key, e))
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        if in_r2(key) {
            self.bucket
                .put(key, value.to_vec())
                .execute()
                .await
                .map_err(|e| r2_err("put", key, e))?;
            self.colo.put_bytes(key, value);
            return Ok(());
        }
        self.kv
            .put_bytes(key, value)
            .map_err(|e| kv_err("put", key, e))?
            .execute()
            .await
            .map_err(|e| kv_err("put", key, e))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        if in_r2(key) {
            self.bucket
                .delete(key)
                .await
                .map_err(|e| r2_err("delete", key, e))?;
            self.colo.delete(key).await;
            return Ok(());
        }
        self.kv
            .delete(key)
            .await
            .map_err(|e| kv_err("delete", key, e))
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        // A prefix either lies inside the R2 range, or may match keys on both sides.
        if in_r2(prefix) {
            return self.list_r2(prefix, limit).await;
        }
        let mut keys = self.list_kv(prefix, limit).await?;
        if R2_PREFIX.starts_with(prefix) {
            keys.extend(self.list_r2(R2_PREFIX, limit).await?);
            keys.sort();
            keys.truncate(limit);
        }
        Ok(keys)
    }
}
