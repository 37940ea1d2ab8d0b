<?php
/**
 * The booking rule of issue 16 (notes/booking.md), the same as the worker's API mode:
 * one closed cash session becomes ONE balanced ADVANCED entry in Paheko's ledger, or is
 * held with a stable code and the figures a treasurer needs — never booked silently on a
 * guess. Runs inside Receiver's transaction (or the admin page's), so the session's state
 * and its entry change together or not at all.
 */

namespace Paheko\Plugin\Recyclique;

use KD2\DB\Date;
use Paheko\DB;
use Paheko\Entities\Accounting\Line;
use Paheko\Entities\Accounting\Transaction;
use Paheko\Entities\Accounting\Year;
use Paheko\Entities\Plugin;
use Paheko\Utils;

use const Paheko\ADMIN_URL;

class Booking
{
	/** The reference of a session's entry: unique per session. */
	static public function reference(string $session_id): string
	{
		return 'RECYCLIQUE-' . $session_id;
	}

	/** The URL of an entry in Paheko's admin. */
	static public function entryUrl(int $id): string
	{
		return ADMIN_URL . 'acc/transactions/details.php?id=' . $id;
	}

	/** "12.34" from 1234 cents. */
	static public function euros(int $cents): string
	{
		return ($cents < 0 ? '-' : '') . intdiv(abs($cents), 100) . '.' . sprintf('%02d', abs($cents) % 100);
	}

	/**
	 * The local calendar day (Y-m-d) of an ISO 8601 time in $timezone; a time without an
	 * offset is read as UTC.
	 */
	static public function localDay(string $time, string $timezone): ?string
	{
		try {
			$t = new \DateTimeImmutable($time, new \DateTimeZone('UTC'));
		}
		catch (\Exception $e) {
			return null;
		}
		return $t->setTimezone(new \DateTimeZone($timezone))->format('Y-m-d');
	}

	/**
	 * Books the closed session $s, or holds it. $as_received skips the reconciliation of
	 * the producer's totals (the treasurer's "book as received"): the gap goes in the
	 * entry's notes instead. Returns the answer's body (status booked | held | empty).
	 */
	static public function close(Plugin $plugin, \stdClass $s, bool $as_received = false): array
	{
		$received = Store::received($s->id);
		$expected = array_filter([
			'total_sales' => $s->total_sales !== null ? (int) $s->total_sales : null,
			'total_items' => $s->total_items !== null ? (int) $s->total_items : null,
		], fn ($v) => $v !== null);
		$gap = [];
		foreach ($expected as $name => $value) {
			if ($value !== $received[$name]) {
				$gap[$name] = $value - $received[$name];
			}
		}

		$figures = ['expected' => (object) $expected, 'received' => $received];
		if ($gap && !$as_received) {
			return self::hold($s, 'totals_mismatch', sprintf(
				'RecyClique a annoncé %s, reçu %s : rien n\'est comptabilisé avant la décision du trésorier',
				self::describe($expected), self::describe($received)), $figures + ['gap' => $gap]);
		}
		if ($received['unbalanced_sales'] && !$as_received) {
			return self::hold($s, 'payments_mismatch', sprintf(
				'%d vente(s) dont les paiements ne font pas le total', count($received['unbalanced_sales'])), $figures);
		}

		$accounts = Settings::parseAccounts(Settings::get($plugin, 'payment_accounts'));
		$unmapped = array_values(array_diff(array_keys(array_filter($received['by_method'])), array_keys($accounts)));
		if ($unmapped) {
			return self::hold($s, 'unmapped_payment_method', sprintf(
				'moyen(s) de paiement sans compte : %s (réglage "comptes par moyen de paiement")',
				implode(', ', $unmapped)), $figures + ['methods' => $unmapped]);
		}

		// Each line: [account code, debit, credit, label]; amounts may be negative (refunds),
		// then the line goes to the other side.
		$lines = [];
		foreach ($received['by_method'] as $method => $sum) {
			if ($sum !== 0) {
				$lines[] = [$accounts[$method], $sum, 0, 'Encaissements ' . $method];
			}
		}
		if ($received['total_sales'] !== 0) {
			$lines[] = [Settings::get($plugin, 'sales_account'), 0, $received['total_sales'], 'Ventes'];
		}
		// If a ticket's payments do not add up (booked as received), the gap is put where
		// the payments say the money is: the sales line takes the payments' sum.
		$paid = array_sum($received['by_method']);
		if ($paid !== $received['total_sales']) {
			foreach ($lines as &$line) {
				if ($line[3] === 'Ventes') {
					$line[2] = $paid;
				}
			}
			unset($line);
			$lines = array_values(array_filter($lines, fn ($l) => $l[1] !== 0 || $l[2] !== 0));
		}
		$cash = $accounts['especes'] ?? null;
		if ($s->closing_amount !== null && $s->actual_amount !== null
			&& (int) $s->actual_amount !== (int) $s->closing_amount) {
			$diff = (int) $s->actual_amount - (int) $s->closing_amount;
			if ($cash === null) {
				return self::hold($s, 'unmapped_payment_method',
					'un écart de caisse sans compte de caisse (moyen "especes")', $figures + ['methods' => ['especes']]);
			}
			if ($diff < 0) {
				$lines[] = [Settings::get($plugin, 'shortage_account'), -$diff, 0, 'Écart de caisse (manquant)'];
				$lines[] = [$cash, 0, -$diff, 'Écart de caisse (manquant)'];
			}
			else {
				$lines[] = [$cash, $diff, 0, 'Écart de caisse (excédent)'];
				$lines[] = [Settings::get($plugin, 'surplus_account'), 0, $diff, 'Écart de caisse (excédent)'];
			}
		}
		if (!$lines) {
			Store::updateSession($s->id, ['state' => 'empty', 'hold_code' => null, 'hold_details' => null]);
			return ['status' => 'empty', 'session_id' => $s->id,
				'message' => 'session sans vente ni écart de caisse : rien à comptabiliser'];
		}

		$timezone = Settings::get($plugin, 'timezone');
		$day = self::localDay((string) $s->closed_at, $timezone);
		if ($day === null) {
			return self::hold($s, 'no_open_year', 'closed_at illisible : ' . $s->closed_at, $figures);
		}
		$db = DB::getInstance();
		$year = $db->first('SELECT id, id_chart FROM acc_years WHERE status = ? AND start_date <= ? AND end_date >= ?
			ORDER BY start_date LIMIT 1;', Year::OPEN, $day, $day);
		if (!$year) {
			return self::hold($s, 'no_open_year', sprintf('aucun exercice ouvert ne contient le %s', $day),
				$figures + ['date' => $day]);
		}
		$ids = [];
		foreach ($lines as $line) {
			$ids[$line[0]] ??= $db->firstColumn('SELECT id FROM acc_accounts WHERE id_chart = ? AND code = ?;',
				$year->id_chart, $line[0]);
		}
		$missing = array_keys(array_filter($ids, fn ($id) => !$id));
		if ($missing) {
			return self::hold($s, 'unknown_account', sprintf('compte(s) absent(s) du plan de l\'exercice : %s',
				implode(', ', $missing)), $figures + ['accounts' => $missing]);
		}

		$t = new Transaction;
		$t->type = Transaction::TYPE_ADVANCED;
		$t->id_year = (int) $year->id;
		$t->date = new Date($day);
		$t->reference = self::reference($s->id);
		$t->label = sprintf('RecyClique — caisse %s du %s',
			$s->register_id ?: substr($s->id, 0, 8), (new \DateTimeImmutable($day))->format('d/m/Y'));
		$notes = sprintf('Session %s : %d ticket(s), %d article(s), %s kg.', $s->id, $received['tickets'],
			$received['total_items'], rtrim(rtrim(sprintf('%.3f', $received['weight_kg']), '0'), '.'));
		if ($gap) {
			$notes .= sprintf("\nComptabilisé tel que reçu : RecyClique annonçait %s, reçu %s (écart %s).",
				self::describe($expected), self::describe($received), self::describe($gap));
		}
		if ($received['unbalanced_sales'] && $as_received) {
			$notes .= sprintf("\nComptabilisé tel que reçu : %d vente(s) dont les paiements ne font pas le total.",
				count($received['unbalanced_sales']));
		}
		if ($s->variance_comment) {
			$notes .= "\nÉcart de caisse : " . $s->variance_comment;
		}
		$t->notes = mb_substr($notes, 0, 2000);
		foreach ($lines as [$code, $debit, $credit, $label]) {
			// A negative sum (refunds) goes to the other side.
			[$debit, $credit] = [max($debit, 0) + max(-$credit, 0), max($credit, 0) + max(-$debit, 0)];
			$t->addLine(Line::create((int) $ids[$code], $credit, $debit, $label));
		}
		$t->save();

		Store::updateSession($s->id, ['state' => 'booked', 'hold_code' => null, 'hold_details' => null,
			'id_transaction' => $t->id()]);
		return ['status' => 'booked', 'session_id' => $s->id, 'reference' => self::reference($s->id),
			'transaction' => $t->id(), 'date' => $day,
			'total_sales' => self::euros($received['total_sales'])];
	}

	/** Marks the session held and says why: the answer is 200 {"status":"held",…}. */
	static protected function hold(\stdClass $s, string $code, string $message, array $details): array
	{
		$details = ['code' => $code, 'message' => $message] + $details;
		Store::updateSession($s->id, ['state' => 'held', 'hold_code' => $code,
			'hold_details' => json_encode($details, JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES)]);
		return ['status' => 'held', 'code' => $code, 'session_id' => $s->id] + $details;
	}

	/** "ventes 12.34 €, 5 article(s)" from figures in cents. */
	static public function describe(array $figures): string
	{
		$parts = [];
		if (array_key_exists('total_sales', $figures)) {
			$parts[] = sprintf('ventes %s €', str_replace('.', ',', self::euros((int) $figures['total_sales'])));
		}
		if (array_key_exists('total_items', $figures)) {
			$parts[] = sprintf('%d article(s)', $figures['total_items']);
		}
		return implode(', ', $parts) ?: 'rien';
	}
}
