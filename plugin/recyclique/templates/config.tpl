{include file="_head.tpl" title="RecyClique — configuration" current="plugin_recyclique"}

<nav class="tabs">
	<ul>
		<li><a href="{$plugin_admin_url}">Sessions de caisse</a></li>
		<li class="current"><a href="{$plugin_admin_url}config.php">Configuration</a></li>
	</ul>
</nav>

{if isset($_GET.ok)}<p class="block confirm">Configuration enregistrée.</p>{/if}
{form_errors}

<form method="post" action="{$self_url}">
	<fieldset>
		<legend>paheko-push</legend>
		<dl>
			<dt><label for="f_secret">Secret partagé avec paheko-push</label></dt>
			<dd class="help">{if $has_secret}Un secret est enregistré ; laisser vide pour le garder.{else}<strong>Aucun secret : les envois sont refusés (503) jusqu'à ce qu'il soit saisi.</strong>{/if}
				Le même que <code>PAHEKO_PLUGIN_SECRET</code> du worker.</dd>
			<dd><input type="password" name="secret" id="f_secret" value="" autocomplete="off" size="50" /></dd>
		</dl>
	</fieldset>
	<fieldset>
		<legend>Comptes</legend>
		<dl>
			<dt><label for="f_payment_accounts">Comptes par moyen de paiement</label></dt>
			<dd class="help">moyen:compte, séparés par des virgules.</dd>
			<dd><input type="text" name="payment_accounts" id="f_payment_accounts" value="{$values.payment_accounts}" size="60" /></dd>
			<dt><label for="f_sales_account">Compte des ventes</label></dt>
			<dd><input type="text" name="sales_account" id="f_sales_account" value="{$values.sales_account}" /></dd>
			<dt><label for="f_shortage_account">Compte des manquants de caisse</label></dt>
			<dd><input type="text" name="shortage_account" id="f_shortage_account" value="{$values.shortage_account}" /></dd>
			<dt><label for="f_surplus_account">Compte des excédents de caisse</label></dt>
			<dd><input type="text" name="surplus_account" id="f_surplus_account" value="{$values.surplus_account}" /></dd>
			<dt><label for="f_timezone">Fuseau horaire (date des écritures)</label></dt>
			<dd><input type="text" name="timezone" id="f_timezone" value="{$values.timezone}" /></dd>
		</dl>
	</fieldset>
	<p class="submit">
		{csrf_field key=$csrf_key}
		<button type="submit" name="save" value="1" class="main">Enregistrer</button>
	</p>
</form>

{include file="_foot.tpl"}
