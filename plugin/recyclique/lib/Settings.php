<?php
/**
 * The plugin's settings, kept in Paheko's plugin config (plugins.config): the shared
 * secret and the accounts of the booking rule. install.php fills them from the
 * environment of `bin/paheko ext recyclique enable` (php-fpm clears the environment, so
 * install time is the only moment it can be read); the admin page changes them.
 */

namespace Paheko\Plugin\Recyclique;

use Paheko\Entities\Plugin;

class Settings
{
	/** The worker's defaults (PAHEKO_PUSH_PAYMENT_ACCOUNTS and friends, docs/paheko.md). */
	const DEFAULTS = [
		'secret' => '',
		'payment_accounts' => 'especes:530,cheque:5112,cb:5115,virement:512',
		'sales_account' => '707',
		'shortage_account' => '658',
		'surplus_account' => '758',
		'timezone' => 'Europe/Paris',
	];

	/** Setting name => the environment variable install.php reads it from. */
	const ENVIRONMENT = [
		'secret' => 'PAHEKO_PLUGIN_SECRET',
		'payment_accounts' => 'PAHEKO_PUSH_PAYMENT_ACCOUNTS',
		'sales_account' => 'PAHEKO_PUSH_SALES_ACCOUNT',
		'shortage_account' => 'PAHEKO_PUSH_CASH_SHORTAGE_ACCOUNT',
		'surplus_account' => 'PAHEKO_PUSH_CASH_SURPLUS_ACCOUNT',
		'timezone' => 'PAHEKO_PUSH_TIMEZONE',
	];

	static public function get(Plugin $plugin, string $name): string
	{
		$value = $plugin->getConfig($name);
		return is_string($value) && $value !== '' ? $value : self::DEFAULTS[$name];
	}

	/** Sets every setting the environment gives (install time). */
	static public function fromEnvironment(Plugin $plugin): void
	{
		foreach (self::ENVIRONMENT as $name => $variable) {
			$value = getenv($variable);
			if (is_string($value) && trim($value) !== '') {
				self::set($plugin, $name, trim($value));
			}
			elseif ($plugin->getConfig($name) === null && $name !== 'secret') {
				$plugin->setConfigProperty($name, self::DEFAULTS[$name]);
			}
		}
	}

	/** Validates and sets one setting; throws \InvalidArgumentException naming it. */
	static public function set(Plugin $plugin, string $name, string $value): void
	{
		if (!array_key_exists($name, self::DEFAULTS)) {
			throw new \InvalidArgumentException('unknown setting: ' . $name);
		}
		if ($name === 'payment_accounts') {
			self::parseAccounts($value);
		}
		elseif ($name === 'timezone') {
			try {
				new \DateTimeZone($value);
			}
			catch (\Exception $e) {
				throw new \InvalidArgumentException('timezone: not a time zone: ' . $value);
			}
		}
		elseif ($name !== 'secret' && !preg_match('/^[0-9A-Za-z]{1,20}$/', $value)) {
			throw new \InvalidArgumentException($name . ': not an account code: ' . $value);
		}
		$plugin->setConfigProperty($name, $value);
	}

	/**
	 * "especes:530,cheque:5112" => ['especes' => '530', 'cheque' => '5112'].
	 * @throws \InvalidArgumentException on a malformed pair
	 */
	static public function parseAccounts(string $text): array
	{
		$map = [];
		foreach (explode(',', $text) as $pair) {
			$pair = trim($pair);
			if ($pair === '') {
				continue;
			}
			$parts = explode(':', $pair);
			if (count($parts) !== 2 || trim($parts[0]) === '' || !preg_match('/^[0-9A-Za-z]{1,20}$/', trim($parts[1]))) {
				throw new \InvalidArgumentException(sprintf('payment_accounts: "%s" is not method:account', $pair));
			}
			$map[trim($parts[0])] = trim($parts[1]);
		}
		if (!$map) {
			throw new \InvalidArgumentException('payment_accounts: no method:account pair');
		}
		return $map;
	}
}
