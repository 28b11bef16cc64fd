#!/usr/bin/env node
// A Node.js client of the udemy_dl intake (`udemy-dl serve`): confirm paid orders, read a task's status.
//
// Requests are signed with Standard Webhooks (the `standardwebhooks` npm package) using the same
// API_SECRET_KEY (whsec_...) that signs the webhooks udemy_dl sends to the payment service. The
// payload signed is `<METHOD> <path and query>\n<body>`, so a signature is good for one request only
// (docs/INTAKE.md, "Signing a request").
//
//   INTAKE_URL=http://127.0.0.1:8080 API_SECRET_KEY=whsec_... node confirm.mjs 101 102 103
//   node confirm.mjs --priority high 104          # VIP order
//   node confirm.mjs --status 101                  # GET /tasks/101
//
// Prints the intake's JSON answer on stdout and "HTTP <status> ..." on stderr.
// Exit status: 0 on a 2xx answer, 1 on any other answer, 2 on a usage error, 3 when the intake
// cannot be reached or API_SECRET_KEY is missing.
//
// Options for testing the intake's checks (never needed in production):
//   --body TEXT        send TEXT as the confirmation body, as is (signed correctly)
//   --msg-id ID        use this webhook-id instead of a fresh random one (replays)
//   --bad-signature    sign with a random key instead of API_SECRET_KEY
//   --old-timestamp    sign with a timestamp 6 minutes in the past
//   --unsigned         send no webhook-* headers at all
//   --body-only-signature  sign the body alone, without method and path (the intake refuses it)
//   --signed-path PATH sign for PATH instead of the path actually requested

import { randomBytes, randomUUID } from "node:crypto";
import { realpathSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { Webhook } from "standardwebhooks";

const DEFAULT_URL = "http://127.0.0.1:8080";
const TIMEOUT_MS = 30_000;

/**
 * What a request's signature covers (the Standard Webhooks payload): the method, a space, the request-target
 * as sent on the request line (path and query string), a line feed, then the body.
 */
export function signedContent(method, target, body) {
  return `${method} ${target}\n${body}`;
}

/**
 * Send one signed request to the intake and return {status, body} (body parsed from JSON when it is JSON).
 *
 * The signature covers webhook-id, webhook-timestamp, the method, the path with its query string, and the exact
 * body text, so the body must be sent byte for byte as signed (a GET has an empty body). The path signed is the
 * one fetch sends: the pathname and search of the URL built here.
 */
export async function intakeRequest(method, path, body = "", options = {}) {
  const baseUrl = (options.baseUrl ?? process.env.INTAKE_URL ?? DEFAULT_URL).replace(/\/+$/, "");
  const url = new URL(`${baseUrl}${path}`);
  const target = `${url.pathname}${url.search}`;
  const secret = options.secret ?? process.env.API_SECRET_KEY;
  const headers = { accept: "application/json" };
  if (body !== "") {
    headers["content-type"] = "application/json";
  }
  if (!options.unsigned) {
    if (!secret) {
      throw new ConfigError("API_SECRET_KEY is not set (the intake's whsec_... key)");
    }
    const msgId = options.msgId ?? `msg_${randomUUID()}`;
    const signedAt = new Date(Date.now() - (options.ageSeconds ?? 0) * 1000);
    const key = options.badSignature ? `whsec_${randomBytes(32).toString("base64")}` : secret;
    headers["webhook-id"] = msgId;
    headers["webhook-timestamp"] = String(Math.floor(signedAt.getTime() / 1000));
    const payload = options.bodyOnlySignature ? body : signedContent(method, options.signedPath ?? target, body);
    headers["webhook-signature"] = new Webhook(key).sign(msgId, signedAt, payload);
  }
  const response = await fetch(url, {
    method,
    headers,
    body: body === "" ? undefined : body,
    signal: AbortSignal.timeout(TIMEOUT_MS),
  });
  const text = await response.text();
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // not JSON (e.g. a proxy's error page): hand back the text
  }
  return { status: response.status, body: parsed, replayed: response.headers.get("idempotent-replayed") === "true" };
}

/** POST /orders/confirm: {enqueued, alreadyQueued, refused} on 202. Safe to call again with the same ids. */
export function confirmPayment(taskIds, priority = undefined, options = {}) {
  const payload = priority === undefined ? { taskIds } : { taskIds, priority };
  return intakeRequest("POST", "/orders/confirm", JSON.stringify(payload), options);
}

/**
 * POST /orders/cancel: {taskId, result, message, status, error}. 200 cancelled (result "cancelled") or already
 * cancelled ("already_cancelled"), 202 still stopping ("requested"), 409 completed or failed before ("refused"),
 * 404 unknown. A cancelled task is `failed` with an error that starts with "cancelled".
 */
export function cancelTask(taskId, reason = undefined, options = {}) {
  const payload = reason === undefined ? { taskId } : { taskId, reason };
  return intakeRequest("POST", "/orders/cancel", JSON.stringify(payload), options);
}

/** GET /tasks/<id>: {taskId, status, progress, attempts, outputPath, bytes, error, ...} on 200, 404 if unknown. */
export function taskStatus(taskId, options = {}) {
  return intakeRequest("GET", `/tasks/${encodeURIComponent(String(taskId))}`, "", options);
}

class ConfigError extends Error {}

class UsageError extends Error {}

function parseTaskIds(values) {
  return values.map((value) => {
    const id = Number(value);
    if (!/^[1-9][0-9]*$/.test(value) || !Number.isSafeInteger(id)) {
      throw new UsageError(`task ids must be positive integers, got ${JSON.stringify(value)} (use --body to send anything)`);
    }
    return id;
  });
}

async function main(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    strict: true,
    options: {
      priority: { type: "string" },
      status: { type: "string" },
      cancel: { type: "string" },
      reason: { type: "string" },
      body: { type: "string" },
      "msg-id": { type: "string" },
      "bad-signature": { type: "boolean", default: false },
      "old-timestamp": { type: "boolean", default: false },
      unsigned: { type: "boolean", default: false },
      "body-only-signature": { type: "boolean", default: false },
      "signed-path": { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(
      "usage: node confirm.mjs [--priority normal|high] TASK_ID...\n       node confirm.mjs --status TASK_ID\n" +
        "       node confirm.mjs --cancel TASK_ID [--reason TEXT]",
    );
    return 0;
  }
  const options = {
    msgId: values["msg-id"],
    badSignature: values["bad-signature"],
    ageSeconds: values["old-timestamp"] ? 6 * 60 : 0,
    unsigned: values.unsigned,
    bodyOnlySignature: values["body-only-signature"],
    signedPath: values["signed-path"],
  };
  let method;
  let path;
  let answer;
  if (values.status !== undefined) {
    [method, path] = ["GET", `/tasks/${values.status}`];
    answer = await intakeRequest(method, `/tasks/${encodeURIComponent(values.status)}`, "", options);
  } else if (values.cancel !== undefined) {
    [method, path] = ["POST", "/orders/cancel"];
    answer = await cancelTask(parseTaskIds([values.cancel])[0], values.reason, options);
  } else if (values.body !== undefined) {
    [method, path] = ["POST", "/orders/confirm"];
    answer = await intakeRequest(method, path, values.body, options);
  } else {
    if (positionals.length === 0) {
      throw new UsageError("give at least one task id (or --status TASK_ID)");
    }
    [method, path] = ["POST", "/orders/confirm"];
    answer = await confirmPayment(parseTaskIds(positionals), values.priority, options);
  }
  const replayed = answer.replayed ? " (replayed: the first answer to this webhook-id)" : "";
  console.error(`HTTP ${answer.status} ${method} ${path}${replayed}`);
  console.log(typeof answer.body === "string" ? answer.body : JSON.stringify(answer.body));
  return answer.status >= 200 && answer.status < 300 ? 0 : 1;
}

const invokedAsScript = process.argv[1] && import.meta.url === pathToFileURL(realpathSync(process.argv[1])).href;
if (invokedAsScript) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (error) => {
      if (error instanceof UsageError || String(error?.code).startsWith("ERR_PARSE_ARGS")) {
        console.error(`confirm.mjs: ${error.message}`);
        process.exitCode = 2;
      } else if (error instanceof ConfigError) {
        console.error(`confirm.mjs: ${error.message}`);
        process.exitCode = 3;
      } else {
        const cause = error?.cause?.code ?? error?.cause?.message ?? "";
        console.error(`confirm.mjs: cannot reach the intake: ${error.message}${cause ? ` (${cause})` : ""}`);
        process.exitCode = 3;
      }
    },
  );
}
