<?php
/**
 * The plugin's settings (lib/Settings.php): the secret shared with paheko-push (changed
 * here when it is rotated; it is never displayed) and the accounts of the booking rule.
 */

namespace Paheko;

use Paheko\Plugin\Recyclique\Settings;

$csrf_key = 'recyclique_config';

$form->runIf('save', function () use ($plugin) {
	foreach (array_keys(Settings::DEFAULTS) as $name) {
		$value = trim((string) f($name));
		if ($name === 'secret' && $value === '') {
			continue; // blank: unchanged
		}
		try {
			Settings::set($plugin, $name, $value);
		}
		catch (\InvalidArgumentException $e) {
			throw new UserException($e->getMessage());
		}
	}
	$plugin->save();
}, $csrf_key, PLUGIN_ADMIN_URL . 'config.php?ok');

$values = [];
foreach (array_keys(Settings::DEFAULTS) as $name) {
	$values[$name] = $name === 'secret' ? '' : Settings::get($plugin, $name);
}
$tpl->assign('values', $values);
$tpl->assign('has_secret', Settings::get($plugin, 'secret') !== '');
$tpl->assign('csrf_key', $csrf_key);
$tpl->display(PLUGIN_ROOT . '/templates/config.tpl');
