<?php
/**
 * True when a request comes from paheko-push with this secret (Standard Webhooks v1).
 *
 * $secret     the secret the worker was given (PAHEKO_PLUGIN_SECRET): whsec_… or plain
 * $id         the webhook-id header, or null when absent
 * $timestamp  the webhook-timestamp header, or null
 * $signatures the webhook-signature header, or null
 * $body       the raw request body, byte for byte
 * $now        the current Unix time (time() when null)
 */
function paheko_push_verify(
    string $secret,
    ?string $id,
    ?string $timestamp,
    ?string $signatures,
    string $body,
    ?int $now = null
): bool {
    if ($id === null || $timestamp === null || $signatures === null || !ctype_digit($timestamp)) {
        return false;
    }
    // Five minutes either way: an old request is a replay, a future one a wrong clock.
    if (abs(($now ?? time()) - (int) $timestamp) > 300) {
        return false;
    }
    $key = strncmp($secret, 'whsec_', 6) === 0 ? base64_decode(substr($secret, 6), true) : $secret;
    if ($key === false || $key === '') {
        return false;
    }
    $expected = base64_encode(hash_hmac('sha256', $id . '.' . $timestamp . '.' . $body, $key, true));
    foreach (explode(' ', $signatures) as $candidate) {
        $parts = explode(',', $candidate, 2);
        if (count($parts) === 2 && $parts[0] === 'v1' && hash_equals($expected, $parts[1])) {
            return true;
        }
    }
    return false;
}
