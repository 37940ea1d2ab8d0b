{include file="_head.tpl" title="RecyClique — sessions de caisse" current="plugin_recyclique"}

<nav class="tabs">
	<ul>
		<li class="current"><a href="{$plugin_admin_url}">Sessions de caisse</a></li>
		{if $session->canAccess($session::SECTION_CONFIG, $session::ACCESS_ADMIN)}
			<li><a href="{$plugin_admin_url}config.php">Configuration</a></li>
		{/if}
	</ul>
</nav>

{form_errors}

<p class="help">
	Chaque session de caisse fermée dans RecyClique devient une écriture (référence <code>RECYCLIQUE-…</code>) :
	un débit par moyen de paiement, le crédit des ventes. Une session dont les totaux ne correspondent pas
	à ce qui a été reçu reste <strong>en attente</strong> : rien n'est comptabilisé sans votre décision.
</p>

{if !$sessions}
	<p class="block alert" id="no-sessions">Aucune session reçue pour l'instant.</p>
{else}
<table class="list" id="sessions">
	<thead>
		<tr>
			<th>Caisse</th>
			<th>Session</th>
			<th>Fermée le</th>
			<td class="num">Tickets</td>
			<td class="money">Ventes</td>
			<td class="num">Poids (kg)</td>
			<th>État</th>
			<td>Écriture</td>
		</tr>
	</thead>
	<tbody>
	{foreach from=$sessions item="s"}
		<tr class="session state-{$s.state}" data-session="{$s.id}" data-state="{$s.state}"{if $s.hold_code} data-code="{$s.hold_code}"{/if}>
			<td>{$s.register}</td>
			<td><code>{$s.id}</code></td>
			<td>{$s.closed_local}</td>
			<td class="num">{$s.tickets}</td>
			<td class="money">{$s.sales_euros}&nbsp;€</td>
			<td class="num">{$s.weight_kg}</td>
			<td class="state">
				<strong>{$s.state_label}</strong>
				{if $s.late_tickets} <span class="alert">({$s.late_tickets} ticket(s) reçu(s) après la fermeture, non comptabilisé(s))</span>{/if}
				{if $s.state == 'held'}
					<br /><span class="hold-code">{$s.hold_code}</span> : {$s.hold_reason}
					{if $s.hold_message}<br /><small class="hold-message">{$s.hold_message}</small>{/if}
				{/if}
			</td>
			<td class="actions">
				{if $s.entry_url}
					<a class="entry" href="{$s.entry_url}">{$s.reference}</a>
				{elseif $s.state == 'held' && $can_resolve}
					<form method="post" action="{$self_url}">
						{csrf_field key=$csrf_key}
						<input type="hidden" name="session" value="{$s.id}" />
						<button type="submit" name="decision" value="book" class="book">Comptabiliser tel que reçu</button>
						<button type="submit" name="decision" value="drop" class="drop">Abandonner</button>
					</form>
				{/if}
			</td>
		</tr>
	{/foreach}
	</tbody>
</table>
{/if}

{include file="_foot.tpl"}
