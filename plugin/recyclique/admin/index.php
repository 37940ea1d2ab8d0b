<?php
/**
 * The cash sessions RecyClique sent, their state and their entry; a held session is
 * resolved here by the treasurer (lib/Admin.php).
 */

namespace Paheko;

use Paheko\Plugin\Recyclique\Admin;
use Paheko\Users\Session;

$csrf_key = 'recyclique_resolve';

$form->runIf(f('decision') && f('session'), function () use ($plugin) {
	$session = Session::getInstance();
	$session->requireAccess($session::SECTION_ACCOUNTING, $session::ACCESS_WRITE);
	Admin::resolve($plugin, (string) f('session'), f('decision') === 'drop' ? 'drop' : 'book');
}, $csrf_key, PLUGIN_ADMIN_URL);

$tpl->assign('sessions', Admin::sessions($plugin));
$tpl->assign('csrf_key', $csrf_key);
$tpl->assign('can_resolve', Session::getInstance()->canAccess(Session::SECTION_ACCOUNTING, Session::ACCESS_WRITE));
$tpl->display(PLUGIN_ROOT . '/templates/index.tpl');
