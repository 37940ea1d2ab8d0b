<?php
/**
 * Paheko runs this when plugin.ini's version changes: the schema only grows
 * (CREATE … IF NOT EXISTS), and settings added by a new version get their defaults.
 */

namespace Paheko;

use Paheko\Plugin\Recyclique\Settings;
use Paheko\Plugin\Recyclique\Store;

Store::install();

foreach (Settings::DEFAULTS as $name => $value) {
	if ($name !== 'secret' && $plugin->getConfig($name) === null) {
		$plugin->setConfigProperty($name, $value);
	}
}
