<?php
/**
 * /p/recyclique/: where paheko-push delivers (lib/Receiver.php). Always JSON.
 */

namespace Paheko;

use Paheko\Plugin\Recyclique\Receiver;

Receiver::serve($plugin);
