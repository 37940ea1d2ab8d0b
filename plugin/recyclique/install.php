<?php
/**
 * `PAHEKO_PLUGIN_SECRET=… php bin/paheko ext recyclique enable` runs this once, inside
 * Paheko's transaction: the plugin's tables; on a fresh Paheko (no year at all) the open
 * year of the current calendar year on the associations' chart fr_pca_2025, which has
 * every account of the booking rule; and the settings from the environment — the secret
 * above all, since php-fpm clears the environment: install time is the only moment it
 * can be read. The admin configuration page changes them later.
 */

namespace Paheko;

use Paheko\Accounting\Charts;
use Paheko\Accounting\Years;
use Paheko\Plugin\Recyclique\Settings;
use Paheko\Plugin\Recyclique\Store;

Store::install();

if (!Years::count()) {
	$year = Years::create(Charts::getOrInstall('fr_pca_2025'));
	$year->save();
}

Settings::fromEnvironment($plugin);
$plugin->save();
