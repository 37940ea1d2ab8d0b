<?php
/**
 * The endpoint /p/recyclique/ (public/index.php): what paheko-push POSTs, one event per
 * request (docs/plugin-contract.md). It authenticates the request, tells the events apart
 * by X-Paheko-Event, de-duplicates on Idempotency-Key, stores, and books a session when
 * it is closed (Booking). Every answer is JSON with a stable code — never an HTML page,
 * whatever fails — because the worker logs and dead-letters what it gets.
 *
 * Exactly once: the key check and the apply happen under one plugin-level lock (flock,
 * so the plugin's own requests queue instead of racing) and in ONE SQLite transaction
 * whose first statement is a write. Paheko's DB::begin() is a deferred BEGIN and
 * Transaction::save() reads first, so a deferred transaction would take the write lock
 * late and parallel writers get "database is locked"; a first write takes it at once,
 * waiting on Paheko's busy timeout. A refused request rolls back: it is not remembered,
 * so the same request after the cause is fixed is processed anew.
 */

namespace Paheko\Plugin\Recyclique;

use Paheko\DB;
use Paheko\Entities\Plugin;

use const Paheko\DATA_ROOT;

require_once __DIR__ . '/verify.php';

class Receiver
{
	const EVENTS = ['pos.session.opened', 'pos.ticket.created', 'pos.session.closed'];
	/** What a 503 asks the worker to wait, in seconds. */
	const RETRY_AFTER = 1;

	/** Serves one request and exits: the only entry point of public/index.php. */
	static public function serve(Plugin $plugin): void
	{
		// Whatever happens below, the worker gets JSON: a fatal error too.
		ob_start();
		register_shutdown_function(function () {
			$error = error_get_last();
			if ($error && in_array($error['type'], [E_ERROR, E_PARSE, E_CORE_ERROR, E_COMPILE_ERROR], true)
				&& !headers_sent()) {
				while (ob_get_level()) {
					ob_end_clean();
				}
				self::send(500, ['error' => 'internal_error', 'message' => 'the plugin failed: see PHP\'s error log']);
			}
		});
		try {
			[$status, $body, $headers] = self::handle($plugin);
		}
		catch (Refusal $e) {
			[$status, $body, $headers] = [$e->status, ['error' => $e->reason, 'message' => $e->getMessage()], $e->headers];
		}
		catch (\Throwable $e) {
			self::rollback();
			if (self::isBusy($e)) {
				[$status, $body, $headers] = [503, ['error' => 'database_busy',
					'message' => 'Paheko\'s database is busy: try again'], ['Retry-After' => (string) self::RETRY_AFTER]];
			}
			else {
				error_log(sprintf('recyclique plugin: %s: %s in %s:%d', get_class($e), $e->getMessage(), $e->getFile(), $e->getLine()));
				[$status, $body, $headers] = [500, ['error' => 'internal_error',
					'message' => 'the plugin failed: ' . get_class($e) . ': ' . mb_substr($e->getMessage(), 0, 300)], []];
			}
		}
		while (ob_get_level()) {
			ob_end_clean();
		}
		self::send($status, $body, $headers);
		exit;
	}

	static protected function send(int $status, array $body, array $headers = []): void
	{
		http_response_code($status);
		header('Content-Type: application/json; charset=utf-8');
		header('Cache-Control: no-store');
		foreach ($headers as $name => $value) {
			header($name . ': ' . $value);
		}
		echo json_encode($body, JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES), "\n";
	}

	/** @return array{int, array, array} status, body, headers */
	static protected function handle(Plugin $plugin): array
	{
		if (($_SERVER['REQUEST_METHOD'] ?? '') !== 'POST') {
			throw new Refusal(405, 'method_not_allowed', 'POST only: this is where paheko-push delivers', ['Allow' => 'POST']);
		}
		$secret = Settings::get($plugin, 'secret');
		if ($secret === '') {
			// Not configured yet: a 5xx keeps the events queued in Redis, not refused.
			throw new Refusal(503, 'not_configured', 'no secret is set: give PAHEKO_PLUGIN_SECRET at install or set it on the plugin\'s configuration page', ['Retry-After' => '60']);
		}
		$raw = file_get_contents('php://input');
		self::authenticate($secret, $raw);

		$type = trim((string) ($_SERVER['HTTP_X_PAHEKO_EVENT'] ?? ''));
		if ($type === 'ping') {
			// `paheko-push check`: proves URL, TLS and secret; nothing is stored.
			return [200, ['status' => 'pong', 'plugin' => 'recyclique', 'version' => $plugin->version], []];
		}
		$key = trim((string) ($_SERVER['HTTP_IDEMPOTENCY_KEY'] ?? ''));
		if ($key === '' || strlen($key) > 200) {
			throw new Refusal(422, 'missing_idempotency_key', 'no Idempotency-Key header (the worker always sends one)');
		}
		$event = json_decode($raw, true);
		if (!is_array($event) || ($event && array_is_list($event))) {
			throw new Refusal(422, 'malformed_json', 'the body is not a JSON object');
		}
		if ($type === '') {
			$type = is_string($event['event'] ?? null) ? $event['event'] : '';
		}
		if ($type === '') {
			throw new Refusal(422, 'missing_event_type', 'no X-Paheko-Event header and no "event" field: the session events carry no type of their own');
		}
		if (!in_array($type, self::EVENTS, true)) {
			throw new Refusal(422, 'unknown_event', sprintf('unknown event type "%s"', mb_substr($type, 0, 60)));
		}

		$lock = self::lock();
		// The serialized part of a request, from the lock to the commit: what bounds a
		// drain (docs/performance.md). Sent as Server-Timing for the operator's logs.
		$locked_at = microtime(true);
		$timing = fn () => ['Server-Timing' => sprintf('write;dur=%.2f', (microtime(true) - $locked_at) * 1000)];
		$db = DB::getInstance();
		$db->begin();
		// The first statement writes: it takes SQLite's write lock now (see the class doc),
		// and it is the key check: a repeat is counted, nothing else changes.
		$db->preparedQuery('UPDATE plugin_recyclique_requests SET repeats = repeats + 1 WHERE idempotency_key = ?;', [$key]);
		if ($db->changes() > 0) {
			$first = $db->first('SELECT status, answer FROM plugin_recyclique_requests WHERE idempotency_key = ?;', $key);
			$db->commit();
			flock($lock, LOCK_UN);
			return [(int) $first->status, json_decode($first->answer, true) + ['repeat' => true], $timing()];
		}
		try {
			// Checked after the key: a repeat is answered as the first time, whatever it holds.
			$event = self::validate($type, $event);
			$session_id = $event['session_id'] ?? $event['cash_session_id'];
			$answer = self::apply($plugin, $type, $event);
		}
		catch (Refusal $e) {
			self::rollback();
			flock($lock, LOCK_UN);
			throw $e;
		}
		$db->preparedQuery('INSERT INTO plugin_recyclique_requests (idempotency_key, event, session_id, status, answer)
			VALUES (?, ?, ?, ?, ?);', [$key, $type, $session_id, 200,
			json_encode($answer, JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES)]);
		$db->commit();
		flock($lock, LOCK_UN);
		return [200, $answer, $timing()];
	}

	/** The plugin-level lock: one writer at a time among the plugin's requests. */
	static protected function lock()
	{
		$path = DATA_ROOT . '/recyclique.lock';
		$lock = fopen($path, 'c');
		if (!$lock || !flock($lock, LOCK_EX)) {
			throw new \RuntimeException('cannot lock ' . $path);
		}
		return $lock;
	}

	static protected function rollback(): void
	{
		try {
			$db = DB::getInstance();
			if ($db->inTransaction()) {
				$db->rollback();
			}
		}
		catch (\Throwable $e) {
			// Nothing more to undo: the request is answered with its own error.
		}
	}

	/** SQLITE_BUSY / SQLITE_LOCKED, however Paheko's DB layer wraps it. */
	static protected function isBusy(\Throwable $e): bool
	{
		for (; $e; $e = $e->getPrevious()) {
			$m = $e->getMessage();
			if (stripos($m, 'database is locked') !== false || stripos($m, 'database is busy') !== false
				|| stripos($m, 'database table is locked') !== false) {
				return true;
			}
		}
		return false;
	}

	static protected function authenticate(string $secret, string $raw): void
	{
		if (isset($_SERVER['HTTP_WEBHOOK_SIGNATURE'])) {
			if (!\paheko_push_verify($secret, $_SERVER['HTTP_WEBHOOK_ID'] ?? null,
				$_SERVER['HTTP_WEBHOOK_TIMESTAMP'] ?? null, $_SERVER['HTTP_WEBHOOK_SIGNATURE'], $raw)) {
				throw new Refusal(401, 'bad_signature', 'the webhook-signature does not match this plugin\'s secret (or the timestamp is more than 5 minutes off)');
			}
			return;
		}
		if (isset($_SERVER['HTTP_X_PAHEKO_SECRET'])) {
			if (!hash_equals($secret, (string) $_SERVER['HTTP_X_PAHEKO_SECRET'])) {
				throw new Refusal(401, 'wrong_secret', 'X-Paheko-Secret does not match this plugin\'s secret');
			}
			return;
		}
		throw new Refusal(401, 'unauthenticated', 'no X-Paheko-Secret and no webhook-signature');
	}

	/** Checks the fields an event needs; 422 naming the first one missing. */
	static protected function validate(string $type, array $e): array
	{
		$need = function (string $field, string $kind) use ($e, $type) {
			$v = $e[$field] ?? null;
			$ok = match ($kind) {
				'id' => (is_string($v) && $v !== '') || is_int($v),
				'cents' => is_int($v),
				'cents?' => $v === null || is_int($v),
				'list' => is_array($v) && array_is_list($v),
			};
			if (!$ok) {
				throw new Refusal(422, 'invalid_field', sprintf('%s: "%s" is missing or not %s', $type, $field,
					['id' => 'an id', 'cents' => 'an integer amount in cents', 'cents?' => 'an integer amount in cents',
					 'list' => 'a list'][$kind]));
			}
		};
		if ($type === 'pos.ticket.created') {
			$need('sale_id', 'id');
			$need('cash_session_id', 'id');
			$need('total_amount', 'cents');
			foreach (['items', 'payments'] as $list) {
				if (array_key_exists($list, $e) && $e[$list] !== null) {
					$need($list, 'list');
				}
			}
			foreach ($e['payments'] ?? [] as $i => $p) {
				if (!is_array($p) || !is_string($p['payment_method'] ?? null) || !is_int($p['amount'] ?? null)) {
					throw new Refusal(422, 'invalid_field', sprintf('pos.ticket.created: payments[%d] needs payment_method and an integer amount', $i));
				}
			}
			foreach ($e['items'] ?? [] as $i => $item) {
				if (!is_array($item)) {
					throw new Refusal(422, 'invalid_field', sprintf('pos.ticket.created: items[%d] is not an object', $i));
				}
			}
			$e['sale_id'] = (string) $e['sale_id'];
			$e['cash_session_id'] = (string) $e['cash_session_id'];
		}
		else {
			$need('session_id', 'id');
			$e['session_id'] = (string) $e['session_id'];
			if ($type === 'pos.session.closed') {
				$need('closed_at', 'id');
				foreach (['closing_amount', 'actual_amount', 'total_sales', 'total_items'] as $f) {
					$need($f, 'cents?');
				}
			}
			else {
				$need('initial_amount', 'cents?');
			}
		}
		return $e;
	}

	/** Applies a new event, inside the transaction; returns the 2xx answer's body. */
	static protected function apply(Plugin $plugin, string $type, array $e): array
	{
		if ($type === 'pos.session.opened') {
			$s = Store::ensureSession($e['session_id']);
			Store::updateSession($s->id, array_filter([
				'register_id' => self::text($e['register_id'] ?? null),
				'site_id' => self::text($e['site_id'] ?? null),
				'operator_id' => self::text($e['operator_id'] ?? null),
				'session_type' => self::text($e['session_type'] ?? null),
				'initial_amount' => $e['initial_amount'] ?? null,
				'opened_at' => self::text($e['opened_at'] ?? null),
			], fn ($v) => $v !== null));
			return ['status' => 'stored', 'event' => $type, 'session_id' => $s->id];
		}
		if ($type === 'pos.ticket.created') {
			$s = Store::ensureSession($e['cash_session_id']);
			if (Store::hasTicket($e['sale_id'])) {
				// The same sale under another key (published twice): stored once.
				return ['status' => 'duplicate', 'event' => $type, 'sale_id' => $e['sale_id'],
					'message' => 'this sale was already received'];
			}
			$after_close = $s->closed_at !== null;
			Store::addTicket($e, $after_close);
			if ($after_close) {
				Store::updateSession($s->id, ['late_tickets' => (int) $s->late_tickets + 1]);
				return ['status' => 'held', 'code' => 'after_close', 'session_id' => $s->id, 'sale_id' => $e['sale_id'],
					'message' => sprintf('ticket stored but not booked: its session was closed (%s)', $s->state)];
			}
			return ['status' => 'stored', 'event' => $type, 'sale_id' => $e['sale_id'], 'session_id' => $s->id];
		}
		// pos.session.closed
		$s = Store::ensureSession($e['session_id']);
		if ($s->closed_at !== null) {
			// Closed before under another key: the first close decided; nothing is booked twice.
			return ['status' => $s->state === 'booked' ? 'booked' : $s->state, 'session_id' => $s->id,
				'message' => 'this session was already closed', 'already_closed' => true]
				+ ($s->id_transaction ? ['transaction' => (int) $s->id_transaction] : [])
				+ ($s->hold_code ? ['code' => $s->hold_code] : []);
		}
		Store::updateSession($s->id, [
			'closed_at' => self::text($e['closed_at']),
			'closing_amount' => $e['closing_amount'] ?? null,
			'actual_amount' => $e['actual_amount'] ?? null,
			'variance_comment' => self::text($e['variance_comment'] ?? null),
			'total_sales' => $e['total_sales'] ?? null,
			'total_items' => $e['total_items'] ?? null,
		]);
		return Booking::close($plugin, Store::session($s->id));
	}

	static protected function text($v): ?string
	{
		return $v === null ? null : (is_scalar($v) ? (string) $v : json_encode($v));
	}
}
