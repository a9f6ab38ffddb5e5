// The baseline of bench/worker_fill.sh: a plain JavaScript worker doing the least a verifying
// pull-through cache must do on a cold blob, entirely in the runtime. GET /blob/<sha256 hex>
// fetches `${UPSTREAM}/v2/bench/blobs/sha256:<hex>`, splits the body with tee(), puts one
// branch into R2 as one put of the announced length with R2's own SHA-256 check, and streams
// the other to the client (with Content-Length). Not part of pullgate; not deployed.
// GET /blob-held/<hex> adds what pullgate's fill does on top (src/worker/fill.rs): the runtime's
// own SHA-256 on the store branch with its last chunk held back, and the client's last 64 KiB
// held until the put resolved, as JavaScript TransformStreams. It attributes the cost of those
// streams (BENCH_JS_ROUTE=blob-held).
function held(toStore, toClient, size, sha256, store) {
  const hasher = new crypto.DigestStream("SHA-256");
  const hashing = hasher.getWriter();
  let last = null;
  const check = new TransformStream({
    async transform(chunk, controller) {
      await hashing.write(chunk.slice());
      if (last) controller.enqueue(last);
      last = chunk;
    },
    async flush(controller) {
      await hashing.close();
      const got = Array.from(new Uint8Array(await hasher.digest),
        (b) => b.toString(16).padStart(2, "0")).join("");
      if (got !== sha256) throw new Error("SHA-256 mismatch");
      if (last) controller.enqueue(last);
    },
  });
  const stored = new FixedLengthStream(size);
  toStore.pipeThrough(check).pipeTo(stored.writable).catch(() => {});
  const done = store(stored.readable);
  const holdback = 65536;
  let queue = [];
  let queued = 0;
  const hold = new TransformStream({
    transform(chunk, controller) {
      queue.push(chunk);
      queued += chunk.byteLength;
      while (queued > holdback) {
        const first = queue[0];
        const excess = queued - holdback;
        if (first.byteLength <= excess) {
          queue.shift();
          queued -= first.byteLength;
          controller.enqueue(first);
        } else {
          queue[0] = first.subarray(excess);
          queued -= excess;
          controller.enqueue(first.subarray(0, excess));
        }
      }
    },
    async flush(controller) {
      await done;
      for (const chunk of queue) controller.enqueue(chunk);
    },
  });
  return [toClient.pipeThrough(hold).pipeThrough(new FixedLengthStream(size)), done];
}

// GET /blob-byob[<N>[m<M>]]/<hex>: what pullgate's fill does since issue 11 (src/worker/fill.rs):
// the store branch straight into R2 as the baseline does; the client branch read with a BYOB
// reader in blocks of up to N MiB (default 1), at least M MiB (default N) per read
// (readAtLeast), in one JavaScript loop; all but the last 64 KiB written on into a
// FixedLengthStream, the tail only after the put resolved. pullgate uses N=4, M=1.
function byob(toStore, toClient, size, store, mib, minMib) {
  const stored = new FixedLengthStream(size);
  toStore.pipeTo(stored.writable).catch(() => {});
  const done = store(stored.readable);
  const holdback = 65536;
  const block = (mib || 1) << 20;
  const least = minMib ? minMib << 20 : block;
  const out = new FixedLengthStream(size);
  const writer = out.writable.getWriter();
  const reader = toClient.getReader({ mode: "byob" });
  (async () => {
    let tail = null;
    try {
      for (;;) {
        const { value, done: end } = await reader.readAtLeast(least, new Uint8Array(block));
        if (value && value.byteLength) {
          let chunk = value;
          if (tail) {
            if (chunk.byteLength >= holdback) {
              writer.write(tail).catch(() => {});
            } else {
              const joined = new Uint8Array(tail.byteLength + chunk.byteLength);
              joined.set(tail);
              joined.set(chunk, tail.byteLength);
              chunk = joined;
            }
            tail = null;
          }
          const cut = Math.max(0, chunk.byteLength - holdback);
          if (cut > 0) await writer.write(chunk.subarray(0, cut));
          // A copy: the tail must not keep the whole block alive.
          tail = chunk.slice(cut);
        }
        if (end) break;
      }
      await done;
      if (tail && tail.byteLength) await writer.write(tail);
      await writer.close();
    } catch (e) {
      reader.cancel(e).catch(() => {});
      writer.abort(e).catch(() => {});
    }
  })();
  return [out.readable, done];
}

export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    const match = url.pathname.match(/^\/(blob|blob-held|blob-byob)(\d*)(?:m(\d+))?\/([0-9a-f]{64})$/);
    if (!match) return new Response("not found", { status: 404 });
    const hex = match[4];
    const upstream = await fetch(`${env.UPSTREAM}/v2/bench/blobs/sha256:${hex}`);
    if (upstream.status !== 200 || !upstream.body) {
      return new Response(`upstream answered ${upstream.status}`, { status: 502 });
    }
    const size = Number(upstream.headers.get("content-length"));
    const [toStore, toClient] = upstream.body.tee();
    const store = (readable) => env.BLOBS.put(`blobs/sha256/${hex}`, readable, { sha256: hex })
      .then(() => console.log(`event=stored key=blobs/sha256/${hex} bytes=${size}`));
    let client;
    if (match[1] === "blob-held" || match[1] === "blob-byob") {
      const [body, done] = match[1] === "blob-held"
        ? held(toStore, toClient, size, hex, store)
        : byob(toStore, toClient, size, store, Number(match[2]), Number(match[3]));
      done.catch((e) => console.error(`event=put-failed key=blobs/sha256/${hex} error=${e}`));
      ctx.waitUntil(done.catch(() => {}));
      client = body;
    } else {
      const stored = new FixedLengthStream(size);
      toStore.pipeTo(stored.writable).catch(() => {});
      ctx.waitUntil(store(stored.readable)
        .catch((e) => console.error(`event=put-failed key=blobs/sha256/${hex} error=${e}`)));
      client = toClient.pipeThrough(new FixedLengthStream(size));
    }
    return new Response(client, {
      headers: { "content-type": "application/octet-stream", "docker-content-digest": `sha256:${hex}` },
    });
  },
};
