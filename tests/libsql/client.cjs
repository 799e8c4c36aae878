// Drives a tenant through @libsql/client (the official TypeScript client,
// unmodified) the way an app does. Run by tests/libsql_client.rs:
//   node client.cjs <write|read|follower> <url> <token> [<read-only token> <other tenant's token>]
// Prints one JSON line of findings; exits non-zero, naming the check, on
// any failure.
const { createClient } = require("@libsql/client");
const assert = require("node:assert/strict");

const [phase, url, token, readOnlyToken, otherToken] = process.argv.slice(2);

async function refused(promise) {
  try {
    await promise;
  } catch (e) {
    return e;
  }
  throw new Error("expected an error, the request succeeded");
}

async function write() {
  const db = createClient({ url, authToken: token });
  await db.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v)");

  // Values in each of SQLite's types come back as they went in.
  await db.execute({
    sql: "INSERT INTO kv VALUES (?, ?)",
    args: ["int", 9007199254740993n],
  });
  await db.execute({ sql: "INSERT INTO kv VALUES (:k, :v)", args: { k: "float", v: 1.5 } });
  await db.execute({ sql: "INSERT INTO kv VALUES (?, ?)", args: ["blob", new Uint8Array([0, 1, 255])] });
  await db.execute({ sql: "INSERT INTO kv VALUES (?, ?)", args: ["null", null] });
  const typed = createClient({ url, authToken: token, intMode: "bigint" });
  const values = await typed.execute("SELECT k, v FROM kv ORDER BY k");
  const got = Object.fromEntries(values.rows.map((r) => [r.k, r.v]));
  assert.equal(got.int, 9007199254740993n, "a 64-bit integer round-trips");
  assert.equal(got.float, 1.5);
  assert.deepEqual(Array.from(new Uint8Array(got.blob)), [0, 1, 255], "a blob round-trips");
  assert.equal(got.null, null);
  assert.deepEqual(values.columns, ["k", "v"]);

  // A batch is one transaction: all of it, or (one statement failing)
  // none of it.
  const batch = await db.batch(
    [
      { sql: "INSERT INTO kv VALUES (?, ?)", args: ["bt1", 1] },
      { sql: "INSERT INTO kv VALUES (?, ?)", args: ["bt2", 2] },
      "SELECT count(*) AS n FROM kv WHERE k LIKE 'bt%'",
    ],
    "write",
  );
  assert.equal(batch[2].rows[0].n, 2, "a batch sees its own writes");
  const failed = await refused(
    db.batch(
      [
        { sql: "INSERT INTO kv VALUES (?, ?)", args: ["bt3", 3] },
        { sql: "INSERT INTO kv VALUES (?, ?)", args: ["bt1", 1] },
      ],
      "write",
    ),
  );
  assert.equal(failed.code, "SQLITE_CONSTRAINT_PRIMARYKEY", failed.message);
  const b3 = await db.execute("SELECT count(*) AS n FROM kv WHERE k = 'bt3'");
  assert.equal(b3.rows[0].n, 0, "nothing of a failed batch is applied");

  // The error code names SQLite's extended result code.
  const duplicate = await refused(db.execute("INSERT INTO kv VALUES ('bt1', 0)"));
  assert.equal(duplicate.code, "SQLITE_CONSTRAINT_PRIMARYKEY", duplicate.message);

  // Interactive transactions: one committed (its reads see its own
  // writes), one rolled back (nothing of it applied).
  const t = await db.transaction("write");
  await t.execute("INSERT INTO kv VALUES ('tx1', 1)");
  const inside = await t.execute("SELECT count(*) AS n FROM kv WHERE k = 'tx1'");
  assert.equal(inside.rows[0].n, 1, "a transaction sees its own writes");
  await t.execute("INSERT INTO kv VALUES ('tx2', 2)");
  await t.commit();
  t.close();
  const committed = await db.execute("SELECT count(*) AS n FROM kv WHERE k IN ('tx1', 'tx2')");
  assert.equal(committed.rows[0].n, 2, "a committed transaction's writes are there");
  const r = await db.transaction("write");
  await r.execute("INSERT INTO kv VALUES ('txr', 1)");
  await r.rollback();
  r.close();
  const rolledBack = await db.execute("SELECT count(*) AS n FROM kv WHERE k = 'txr'");
  assert.equal(rolledBack.rows[0].n, 0, "a rolled back transaction applied nothing");

  // A read-only token reads and may not write; another tenant's token
  // opens nothing here.
  const reader = createClient({ url, authToken: readOnlyToken });
  const read = await reader.execute("SELECT count(*) AS n FROM kv");
  assert.ok(read.rows[0].n >= 6);
  const readOnly = await refused(reader.execute("INSERT INTO kv VALUES ('ro', 1)"));
  assert.equal(readOnly.code, "SQLITE_READONLY", readOnly.message);
  const stranger = createClient({ url, authToken: otherToken });
  const forbidden = await refused(stranger.execute("SELECT 1"));
  assert.match(forbidden.message, /opens customer/, forbidden.message);

  // Acknowledged writes, one by one: each answered once durable.
  let acknowledged = 0;
  for (let i = 0; i < 20; i++) {
    await db.execute({ sql: "INSERT INTO kv VALUES (?, ?)", args: [`ack${i}`, i] });
    acknowledged++;
  }
  // A transaction left open: the holder is SIGKILLed before its COMMIT.
  const open = await db.transaction("write");
  await open.execute("INSERT INTO kv VALUES ('open-tx', 1)");
  const seen = await open.execute("SELECT count(*) AS n FROM kv WHERE k = 'open-tx'");
  assert.equal(seen.rows[0].n, 1);
  return { acknowledged };
}

async function read() {
  const db = createClient({ url, authToken: token });
  const rows = await db.execute("SELECT count(*) AS n FROM kv WHERE k LIKE 'ack%'");
  const b = await db.execute("SELECT count(*) AS n FROM kv WHERE k LIKE 'bt%'");
  const open = await db.execute("SELECT count(*) AS n FROM kv WHERE k = 'open-tx'");
  const tx = await db.execute("SELECT count(*) AS n FROM kv WHERE k IN ('tx1', 'tx2', 'txr')");
  return {
    acknowledged: Number(rows.rows[0].n),
    batch: Number(b.rows[0].n),
    uncommitted: Number(open.rows[0].n),
    committed_tx: Number(tx.rows[0].n),
  };
}

// Through a machine that does not hold the tenant: a read is answered by
// its replica, a write by the holder (forwarded), and a read after it,
// carrying the write's bookmark the way an app would, sees it.
async function follower() {
  const roles = [];
  let bookmark;
  const db = createClient({
    url,
    authToken: token,
    fetch: async (request) => {
      if (bookmark) request.headers.set("tenantd-bookmark", bookmark);
      const response = await fetch(request);
      roles.push(response.headers.get("tenantd-role"));
      bookmark = response.headers.get("tenantd-bookmark") ?? bookmark;
      return response;
    },
  });
  const before = await db.execute("SELECT count(*) AS n FROM kv");
  const readRole = roles.at(-1);
  await db.execute({ sql: "INSERT INTO kv VALUES (?, ?)", args: ["via-follower", 1] });
  const writeRole = roles.at(-1);
  const after = await db.execute("SELECT count(*) AS n FROM kv WHERE k = 'via-follower'");
  return {
    before: Number(before.rows[0].n),
    read_role: readRole,
    write_role: writeRole,
    after: Number(after.rows[0].n),
    after_role: roles.at(-1),
  };
}

const phases = { write, read, follower };
phases[phase]().then(
  (found) => console.log(JSON.stringify(found)),
  (e) => {
    console.error(`libsql client check failed: ${e.stack || e}`);
    process.exit(1);
  },
);
