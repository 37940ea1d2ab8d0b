<?php
/**
 * A request the plugin answers with a 4xx or 5xx and a stable code (`reason`, the JSON
 * answer's "error"). It is never remembered: the transaction rolls back, so the same
 * request after the cause is fixed is processed anew.
 */

namespace Paheko\Plugin\Recyclique;

class Refusal extends \RuntimeException
{
	public function __construct(public int $status, public string $reason, string $message, public array $headers = [])
	{
		parent::__construct($message);
	}
}
