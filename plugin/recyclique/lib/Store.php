<?php
/**
 * What the plugin keeps in Paheko's database: the requests it accepted (by
 * Idempotency-Key, with the answer they got), the cash sessions, their tickets, items
 * (with weights, for the eco-organism reports) and payments. Every write happens inside
 * Receiver's one transaction; nothing here opens or commits one.
 */

namespace Paheko\Plugin\Recyclique;

use Paheko\DB;

class Store
{
	const SCHEMA = <<<'SQL'
		CREATE TABLE IF NOT EXISTS plugin_recyclique_requests (
			-- Every request answered 2xx, by its Idempotency-Key: a repeat gets the same
			-- answer and changes nothing. Refused requests are not kept.
			idempotency_key TEXT NOT NULL PRIMARY KEY,
			event TEXT NOT NULL,
			session_id TEXT NULL,
			status INTEGER NOT NULL,
			answer TEXT NOT NULL,
			repeats INTEGER NOT NULL DEFAULT 0,
			received_at TEXT NOT NULL DEFAULT (datetime('now'))
		);
		CREATE TABLE IF NOT EXISTS plugin_recyclique_sessions (
			id TEXT NOT NULL PRIMARY KEY,
			register_id TEXT NULL,
			site_id TEXT NULL,
			operator_id TEXT NULL,
			session_type TEXT NULL,
			initial_amount INTEGER NULL,
			opened_at TEXT NULL,
			closed_at TEXT NULL,
			closing_amount INTEGER NULL,
			actual_amount INTEGER NULL,
			variance_comment TEXT NULL,
			total_sales INTEGER NULL,
			total_items INTEGER NULL,
			-- open, booked, held, empty (closed with nothing to book), dropped
			state TEXT NOT NULL DEFAULT 'open',
			hold_code TEXT NULL,
			hold_details TEXT NULL,
			id_transaction INTEGER NULL,
			late_tickets INTEGER NOT NULL DEFAULT 0,
			updated_at TEXT NOT NULL DEFAULT (datetime('now'))
		);
		CREATE TABLE IF NOT EXISTS plugin_recyclique_tickets (
			sale_id TEXT NOT NULL PRIMARY KEY,
			session_id TEXT NOT NULL,
			operator_id TEXT NULL,
			total_amount INTEGER NOT NULL,
			note TEXT NULL,
			sale_date TEXT NULL,
			-- 1: arrived after its session was closed; stored, never folded in silently
			after_close INTEGER NOT NULL DEFAULT 0,
			received_at TEXT NOT NULL DEFAULT (datetime('now'))
		);
		CREATE INDEX IF NOT EXISTS plugin_recyclique_tickets_session ON plugin_recyclique_tickets (session_id);
		CREATE TABLE IF NOT EXISTS plugin_recyclique_items (
			sale_id TEXT NOT NULL,
			id TEXT NULL,
			category_id TEXT NULL,
			preset_id TEXT NULL,
			quantity REAL NULL,
			unit_price INTEGER NULL,
			total_price INTEGER NULL,
			weight REAL NULL
		);
		CREATE INDEX IF NOT EXISTS plugin_recyclique_items_sale ON plugin_recyclique_items (sale_id);
		CREATE TABLE IF NOT EXISTS plugin_recyclique_payments (
			sale_id TEXT NOT NULL,
			id TEXT NULL,
			method TEXT NOT NULL,
			amount INTEGER NOT NULL
		);
		CREATE INDEX IF NOT EXISTS plugin_recyclique_payments_sale ON plugin_recyclique_payments (sale_id);
		SQL;

	const TABLES = ['plugin_recyclique_payments', 'plugin_recyclique_items',
		'plugin_recyclique_tickets', 'plugin_recyclique_sessions', 'plugin_recyclique_requests'];

	static public function install(): void
	{
		DB::getInstance()->exec(self::SCHEMA);
	}

	static public function uninstall(): void
	{
		$db = DB::getInstance();
		foreach (self::TABLES as $table) {
			$db->exec(sprintf('DROP TABLE IF EXISTS %s;', $table));
		}
	}

	/** The session row, or null. */
	static public function session(string $id): ?\stdClass
	{
		return DB::getInstance()->first('SELECT * FROM plugin_recyclique_sessions WHERE id = ?;', $id) ?: null;
	}

	/** Creates the session row if it does not exist (a ticket may come first). */
	static public function ensureSession(string $id): \stdClass
	{
		DB::getInstance()->preparedQuery('INSERT OR IGNORE INTO plugin_recyclique_sessions (id) VALUES (?);', [$id]);
		return self::session($id);
	}

	static public function updateSession(string $id, array $fields): void
	{
		$fields['updated_at'] = gmdate('Y-m-d H:i:s');
		$set = implode(', ', array_map(fn ($k) => $k . ' = ?', array_keys($fields)));
		DB::getInstance()->preparedQuery(
			sprintf('UPDATE plugin_recyclique_sessions SET %s WHERE id = ?;', $set),
			array_merge(array_values($fields), [$id])
		);
	}

	/** True when the sale was stored already (under another Idempotency-Key). */
	static public function hasTicket(string $sale_id): bool
	{
		return (bool) DB::getInstance()->firstColumn('SELECT 1 FROM plugin_recyclique_tickets WHERE sale_id = ?;', $sale_id);
	}

	static public function addTicket(array $t, bool $after_close): void
	{
		$db = DB::getInstance();
		$db->preparedQuery('INSERT INTO plugin_recyclique_tickets
			(sale_id, session_id, operator_id, total_amount, note, sale_date, after_close)
			VALUES (?, ?, ?, ?, ?, ?, ?);', [
			$t['sale_id'], $t['cash_session_id'], self::text($t['operator_id'] ?? null),
			$t['total_amount'], self::text($t['note'] ?? null), self::text($t['sale_date'] ?? null),
			$after_close ? 1 : 0,
		]);
		foreach ($t['items'] ?? [] as $item) {
			$db->preparedQuery('INSERT INTO plugin_recyclique_items
				(sale_id, id, category_id, preset_id, quantity, unit_price, total_price, weight)
				VALUES (?, ?, ?, ?, ?, ?, ?, ?);', [
				$t['sale_id'], self::text($item['id'] ?? null), self::text($item['category_id'] ?? null),
				self::text($item['preset_id'] ?? null), self::number($item['quantity'] ?? null),
				self::integer($item['unit_price'] ?? null), self::integer($item['total_price'] ?? null),
				self::number($item['weight'] ?? null),
			]);
		}
		foreach ($t['payments'] ?? [] as $payment) {
			$db->preparedQuery('INSERT INTO plugin_recyclique_payments (sale_id, id, method, amount)
				VALUES (?, ?, ?, ?);', [
				$t['sale_id'], self::text($payment['id'] ?? null),
				(string) $payment['payment_method'], (int) $payment['amount'],
			]);
		}
	}

	/**
	 * What was received for a session (tickets not flagged after_close): ticket count,
	 * Σ total_amount, item lines, Σ weight, payments per method, and the sales whose
	 * payments do not add up to their total.
	 */
	static public function received(string $session_id): array
	{
		$db = DB::getInstance();
		$totals = $db->first('SELECT COUNT(*) AS tickets, COALESCE(SUM(total_amount), 0) AS sales
			FROM plugin_recyclique_tickets WHERE session_id = ? AND after_close = 0;', $session_id);
		$items = $db->first('SELECT COUNT(*) AS lines, COALESCE(SUM(i.weight), 0) AS weight
			FROM plugin_recyclique_items i INNER JOIN plugin_recyclique_tickets t ON t.sale_id = i.sale_id
			WHERE t.session_id = ? AND t.after_close = 0;', $session_id);
		$methods = $db->getAssoc('SELECT p.method, SUM(p.amount)
			FROM plugin_recyclique_payments p INNER JOIN plugin_recyclique_tickets t ON t.sale_id = p.sale_id
			WHERE t.session_id = ? AND t.after_close = 0 GROUP BY p.method ORDER BY p.method;', $session_id);
		$unbalanced = $db->getAssoc('SELECT t.sale_id, t.total_amount - COALESCE((SELECT SUM(p.amount)
				FROM plugin_recyclique_payments p WHERE p.sale_id = t.sale_id), 0) AS gap
			FROM plugin_recyclique_tickets t WHERE t.session_id = ? AND t.after_close = 0 AND gap != 0
			ORDER BY t.sale_id;', $session_id);
		return [
			'tickets' => (int) $totals->tickets,
			'total_sales' => (int) $totals->sales,
			'total_items' => (int) $items->lines,
			'weight_kg' => round((float) $items->weight, 3),
			'by_method' => array_map('intval', $methods),
			'unbalanced_sales' => array_map('intval', $unbalanced),
		];
	}

	static protected function text($value): ?string
	{
		return $value === null ? null : (is_scalar($value) ? (string) $value : json_encode($value));
	}

	static protected function integer($value): ?int
	{
		return is_numeric($value) ? (int) $value : null;
	}

	static protected function number($value): ?float
	{
		return is_numeric($value) ? (float) $value : null;
	}
}
