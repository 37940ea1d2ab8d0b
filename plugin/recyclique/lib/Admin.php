<?php
/**
 * The treasurer's side (admin/index.php): the received cash sessions with their state
 * and the link to their entry, and the decision on a held session — book it as received
 * (the gap written in the entry's notes) or drop it. A decision runs under the same
 * plugin lock and in one transaction, like a delivery, so it cannot race one.
 */

namespace Paheko\Plugin\Recyclique;

use Paheko\DB;
use Paheko\Entities\Plugin;
use Paheko\UserException;

use const Paheko\DATA_ROOT;

class Admin
{
	const STATES = [
		'open' => 'Ouverte',
		'booked' => 'Comptabilisée',
		'held' => 'En attente',
		'empty' => 'Fermée, rien à comptabiliser',
		'dropped' => 'Abandonnée',
	];

	const CODES = [
		'totals_mismatch' => 'les totaux annoncés par RecyClique ne correspondent pas aux tickets reçus',
		'payments_mismatch' => 'des ventes dont les paiements ne font pas le total',
		'unmapped_payment_method' => 'un moyen de paiement sans compte',
		'no_open_year' => 'aucun exercice ouvert ne contient la date',
		'unknown_account' => 'un compte absent du plan comptable',
	];

	/** Every session, most recent first, with its figures for the list. */
	static public function sessions(Plugin $plugin): array
	{
		$timezone = new \DateTimeZone(Settings::get($plugin, 'timezone'));
		$rows = DB::getInstance()->get('SELECT s.*,
				(SELECT COUNT(*) FROM plugin_recyclique_tickets t WHERE t.session_id = s.id AND t.after_close = 0) AS tickets,
				(SELECT COALESCE(SUM(total_amount), 0) FROM plugin_recyclique_tickets t WHERE t.session_id = s.id AND t.after_close = 0) AS sales,
				(SELECT COALESCE(SUM(i.weight), 0) FROM plugin_recyclique_items i INNER JOIN plugin_recyclique_tickets t ON t.sale_id = i.sale_id
					WHERE t.session_id = s.id AND t.after_close = 0) AS weight
			FROM plugin_recyclique_sessions s
			ORDER BY COALESCE(s.closed_at, s.opened_at, s.updated_at) DESC, s.id;');
		foreach ($rows as $s) {
			$s->state_label = self::STATES[$s->state] ?? $s->state;
			$s->sales_euros = str_replace('.', ',', Booking::euros((int) $s->sales));
			$s->weight_kg = str_replace('.', ',', rtrim(rtrim(sprintf('%.3f', (float) $s->weight), '0'), '.'));
			$s->entry_url = $s->id_transaction ? Booking::entryUrl((int) $s->id_transaction) : null;
			$s->reference = Booking::reference($s->id);
			$details = $s->hold_details ? json_decode($s->hold_details, true) : null;
			$s->hold_reason = $s->hold_code ? (self::CODES[$s->hold_code] ?? $s->hold_code) : null;
			$s->hold_message = $details['message'] ?? null;
			$s->register = $s->register_id ?: substr($s->id, 0, 8);
			$s->closed_local = null;
			if ($s->closed_at) {
				try {
					$s->closed_local = (new \DateTimeImmutable($s->closed_at, new \DateTimeZone('UTC')))
						->setTimezone($timezone)->format('d/m/Y H:i');
				}
				catch (\Exception $e) {
					$s->closed_local = $s->closed_at;
				}
			}
		}
		return $rows;
	}

	/** "book" (as received) or "drop" a held session. */
	static public function resolve(Plugin $plugin, string $session_id, string $decision): void
	{
		$path = DATA_ROOT . '/recyclique.lock';
		$lock = fopen($path, 'c');
		if (!$lock || !flock($lock, LOCK_EX)) {
			throw new UserException('Verrou indisponible : ' . $path);
		}
		$db = DB::getInstance();
		$db->begin();
		try {
			// A write first, as in Receiver: the write lock is taken now.
			$db->preparedQuery('UPDATE plugin_recyclique_sessions SET updated_at = datetime(\'now\') WHERE id = ?;', [$session_id]);
			$s = Store::session($session_id);
			if (!$s || $s->state !== 'held') {
				throw new UserException('Cette session n\'est pas en attente.');
			}
			if ($decision === 'drop') {
				Store::updateSession($s->id, ['state' => 'dropped']);
			}
			else {
				$answer = Booking::close($plugin, $s, true);
				if ($answer['status'] === 'held') {
					$db->commit();
					throw new UserException('Toujours en attente : ' . $answer['message']);
				}
			}
			$db->commit();
		}
		catch (\Throwable $e) {
			if ($db->inTransaction()) {
				$db->rollback();
			}
			throw $e;
		}
		finally {
			flock($lock, LOCK_UN);
		}
	}
}
