// Mint a status token for one task, as the shop's backend does before it links the customer to
// GET /status/<taskId>?token=... or opens GET /tasks/<taskId>/events?token=... (docs/STATUS.md).
//
//   v1.<taskId>.<expires, unix seconds>.<base64url, no padding, of HMAC-SHA256(secret, "v1.<taskId>.<expires>")>
//
// Nothing but node:crypto: no library of ours. The key is STATUS_TOKEN_SECRET, never API_SECRET_KEY.
//
//   STATUS_TOKEN_SECRET=... node status-token.mjs TASK_ID [TTL_SECONDS]
import { createHmac } from "node:crypto";

export function statusToken(taskId, secret, ttlSeconds = 900, nowSeconds = Math.floor(Date.now() / 1000)) {
  if (!Number.isSafeInteger(taskId) || taskId <= 0) throw new Error(`task id must be a positive integer, got ${taskId}`);
  if (!Number.isSafeInteger(ttlSeconds) || ttlSeconds <= 0) throw new Error(`ttl must be whole seconds, got ${ttlSeconds}`);
  if (!secret) throw new Error("STATUS_TOKEN_SECRET is not set");
  const expires = nowSeconds + ttlSeconds;
  const message = `v1.${taskId}.${expires}`;
  const signature = createHmac("sha256", secret).update(message).digest("base64url"); // base64url has no padding
  return `${message}.${signature}`;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [taskId, ttl] = process.argv.slice(2);
  if (!taskId) {
    console.error("usage: STATUS_TOKEN_SECRET=... node status-token.mjs TASK_ID [TTL_SECONDS]");
    process.exit(2);
  }
  try {
    console.log(statusToken(Number(taskId), process.env.STATUS_TOKEN_SECRET, ttl === undefined ? 900 : Number(ttl)));
  } catch (error) {
    console.error(`status-token: ${error.message}`);
    process.exit(2);
  }
}
