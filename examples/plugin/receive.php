<?php
/**
 * A reference receiver for paheko-push: the smallest correct receiving end of
 * docs/plugin-contract.md, in PHP 8 with PDO/SQLite (the engine Paheko itself uses).
 * A starting point for the Paheko plugin, tested end to end by tests/receiver.rs behind
 * nginx (TLS) and php-fpm while a real worker delivers to it through kill -9 and a busy
 * database.
 *
 * What it does, in the contract's terms:
 * - checks the request: the Standard Webhooks signature when there is one, with
 *   paheko_push_verify() from docs/plugin-contract.md (verify.php, extracted from the
 *   document, never copied by hand), or else the X-Paheko-Secret header; 401 when it
 *   does not match;
 * - stores the event under its Idempotency-Key, a UNIQUE column, in one transaction;
 *   a key it already has is a repeat: nothing is stored, the answer is the first one's;
 * - answers 200 once committed, 503 with Retry-After while the database is busy (the
 *   worker retries), 422 for a request it can never accept (it goes to the worker's
 *   dead letters, with this answer's text as the reason).
 *
 * Configuration, from the environment (php-fpm: env[...] in the pool):
 *   PAHEKO_PUSH_SECRET  the secret the worker was given (whsec_… or plain)
 *   PAHEKO_PUSH_DB      the SQLite file (created with its table when missing)
 * In a Paheko plugin both come from the plugin's configuration and Paheko's database.
 */

declare(strict_types=1);

require __DIR__ . '/verify.php';

/** How long to wait for another writer before answering 503, in seconds. */
const BUSY_TIMEOUT = 1;
/** What the 503 asks the worker to wait, in seconds. */
const RETRY_AFTER = 1;
/** The event types this receiver knows; another one could never be accepted. */
const EVENT_TYPES = ['pos.session.opened', 'pos.ticket.created', 'pos.session.closed'];

function answer(int $status, string $text, array $headers = []): never
{
    http_response_code($status);
    header('Content-Type: text/plain; charset=utf-8');
    foreach ($headers as $name => $value) {
        header("$name: $value");
    }
    echo $text, "\n";
    exit;
}

function open_database(string $path): PDO
{
    $db = new PDO('sqlite:' . $path, null, null, [
        PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
        PDO::ATTR_TIMEOUT => BUSY_TIMEOUT,
    ]);
    $db->exec('CREATE TABLE IF NOT EXISTS paheko_push_events (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
        idempotency_key TEXT NOT NULL UNIQUE,               -- the stream entry ID
        session_id      TEXT NOT NULL,
        event_type      TEXT NOT NULL,
        body            TEXT NOT NULL,                      -- byte for byte
        answer          TEXT NOT NULL,                      -- what the first request got
        repeats         INTEGER NOT NULL DEFAULT 0,         -- repeats answered, not stored
        stored_at       TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
    )');
    return $db;
}

/** SQLITE_BUSY (5) or SQLITE_LOCKED (6): another writer holds the database. */
function is_busy(PDOException $e): bool
{
    return in_array($e->errorInfo[1] ?? null, [5, 6], true)
        || str_contains($e->getMessage(), 'database is locked');
}

if (($_SERVER['REQUEST_METHOD'] ?? '') !== 'POST') {
    answer(405, 'POST only', ['Allow' => 'POST']);
}
$secret = (string) getenv('PAHEKO_PUSH_SECRET');
$database = (string) getenv('PAHEKO_PUSH_DB');
if ($secret === '' || $database === '') {
    // The plugin is not configured: a 5xx keeps events queued in Redis, not refused.
    answer(503, 'receiver not configured', ['Retry-After' => '60']);
}

// Authentication, on the raw body, before anything is decoded.
$body = file_get_contents('php://input');
if (isset($_SERVER['HTTP_WEBHOOK_SIGNATURE'])) {
    $genuine = paheko_push_verify(
        $secret,
        $_SERVER['HTTP_WEBHOOK_ID'] ?? null,
        $_SERVER['HTTP_WEBHOOK_TIMESTAMP'] ?? null,
        $_SERVER['HTTP_WEBHOOK_SIGNATURE'],
        $body
    );
    if (!$genuine) {
        answer(401, 'invalid signature');
    }
} elseif (isset($_SERVER['HTTP_X_PAHEKO_SECRET'])) {
    if (!hash_equals($secret, $_SERVER['HTTP_X_PAHEKO_SECRET'])) {
        answer(401, 'wrong secret');
    }
} else {
    answer(401, 'no signature and no secret');
}

// Content that no retry could make acceptable: 422, with the reason.
$key = $_SERVER['HTTP_IDEMPOTENCY_KEY'] ?? '';
if (!preg_match('/^\d{1,20}-\d{1,20}$/', $key)) {
    answer(422, 'missing or malformed Idempotency-Key');
}
$event = json_decode($body, true);
if (!is_array($event) || array_is_list($event)) {
    answer(422, 'the body is not a JSON object');
}
$type = $_SERVER['HTTP_X_PAHEKO_EVENT'] ?? ($event['event'] ?? null);
if (!in_array($type, EVENT_TYPES, true)) {
    answer(422, 'unknown event type ' . json_encode($type));
}
$session = $event['cash_session_id'] ?? $event['session_id'] ?? null;
if (!is_string($session) || $session === '') {
    answer(422, 'no cash_session_id or session_id');
}

$stored = 'stored ' . $key;
$db = null;
try {
    $db = open_database($database);
    // The write lock first: a busy database fails here, with nothing done.
    $db->exec('BEGIN IMMEDIATE');
    $first = $db->prepare('SELECT answer FROM paheko_push_events WHERE idempotency_key = ?');
    $first->execute([$key]);
    $previous = $first->fetchColumn();
    if ($previous !== false) {
        // A repeat (the worker did not get our answer, or died before acknowledging):
        // apply nothing, count it, answer as the first time.
        $db->prepare('UPDATE paheko_push_events SET repeats = repeats + 1 WHERE idempotency_key = ?')
            ->execute([$key]);
        $db->exec('COMMIT');
        answer(200, $previous);
    }
    // Here a Paheko plugin writes its own records (the session, the accounting
    // entries) in this same transaction.
    $db->prepare('INSERT INTO paheko_push_events
            (idempotency_key, session_id, event_type, body, answer) VALUES (?, ?, ?, ?, ?)')
        ->execute([$key, $session, $type, $body, $stored]);
    $db->exec('COMMIT');
} catch (PDOException $e) {
    if ($db !== null && $db->inTransaction()) {
        $db->rollBack();
    }
    if (is_busy($e)) {
        answer(503, 'database busy', ['Retry-After' => (string) RETRY_AFTER]);
    }
    error_log('paheko-push receiver: ' . $e->getMessage());
    // Anything else on our side is worth another try, not a refusal.
    answer(500, 'database error');
}
answer(200, $stored);
