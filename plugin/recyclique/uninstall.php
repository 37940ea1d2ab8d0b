<?php
/**
 * `php bin/paheko ext recyclique delete`: the plugin's own tables go. The ledger entries
 * it booked stay: they are the association's accounts, not the plugin's.
 */

namespace Paheko;

use Paheko\Plugin\Recyclique\Store;

Store::uninstall();
