"""Classification rules: which message topics Amazon lets through to opted-out buyers.

A :class:`Rule` is a named set of regexes with a class. Rules are tried in order and the first
match wins (flufl.bounce style: one ordered registry, most decisive first). The caller puts the
seller's own rules from the config first and :data:`BUILTIN_RULES` after them.

Built-in topics follow Amazon's lists (amazon.md sections 2.2 and 2.4). Their order encodes these
decisions:

1. **Product safety and recalls first.** A recall must reach the buyer even when it is sent with
   a bulk tool that adds ``List-Unsubscribe``.
2. **Solicitations next: feedback/review requests and marketing.** A message that asks for a
   review or advertises stays non-critical even when it also mentions delivery or an address.
   Amazon judges the contact reason, a solicitation is never needed to complete an order, and
   otherwise any review request could pass the opt-out by naming the delivery. The reject reason
   names the rule, so the seller can send the critical part on its own.
3. **Out-of-stock/delay notices that offer another product** (Amazon: cancel instead) come before
   delivery scheduling: "delayed, here is an alternative" is non-critical, "delayed, please
   choose a new delivery slot" is critical.
4. **Critical topics** (address, delivery scheduling and bulky items, fulfilment problems,
   customisation, returns, invoices) before the **confirmations, thank-yous and proactive
   service** they share words with: "Thank you for your order, but the address is incomplete" is
   critical. Refund *confirmations* go just before return questions, as they mention the return.

Critical patterns name a problem or an action the buyer must take ("choose a delivery slot",
"address is incomplete"), never a bare topic word ("delivery"), so confirmations stay
non-critical. Each topic is a rule on the subject and one on the body (plus a few), one name, in
English, German, French, Spanish, Italian and Japanese. Built-in patterns are lower case and run
on lower-cased text behind one leading word boundary: Python's ``re`` runs them about 20 times
faster than with IGNORECASE and a boundary per branch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from mailrelay.policy.message import MessageView

RuleClass = Literal["critical", "non-critical"]
CLASSES: tuple[str, ...] = ("critical", "non-critical")


@dataclass(frozen=True, slots=True)
class Rule:
    """A named classification rule; it matches when every given pattern matches.

    ``lowered`` rules (the built-ins) have lower-case patterns searched in the lower-cased subject
    and text; config rules are case-insensitive regexes searched in the text as written.
    """

    name: str
    cls: RuleClass
    subject: re.Pattern[str] | None = None
    body: re.Pattern[str] | None = None
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()
    lowered: bool = False


def _compile(rule: str, where: str, pattern: str, flags: int = re.IGNORECASE) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"rule {rule!r}: {where} pattern must be a non-empty string")
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"rule {rule!r}: bad {where} regex {pattern!r}: {exc}") from None


def compile_rule(
    name: str,
    cls: str,
    subject: str | None = None,
    body: str | None = None,
    header: dict[str, str] | None = None,
) -> Rule:
    """Build a rule from config strings; regexes are case-insensitive and searched anywhere.

    Raises ValueError with a message naming the rule and the bad part, because config loading
    shows it to the user as is.
    """
    if not name or not isinstance(name, str):
        raise ValueError("rule name must be a non-empty string")
    if cls not in CLASSES:
        raise ValueError(f"rule {name!r}: class must be 'critical' or 'non-critical', not {cls!r}")
    if subject is None and body is None and not header:
        raise ValueError(f"rule {name!r}: give at least one of subject, body or header")
    headers: list[tuple[str, re.Pattern[str]]] = []
    for key, pattern in (header or {}).items():
        if not isinstance(key, str) or not re.fullmatch(r"[!-9;-~]+", key):
            raise ValueError(f"rule {name!r}: bad header name {key!r}")
        headers.append((key.lower(), _compile(name, f"header {key}", pattern)))
    return Rule(
        name=name,
        cls=cls,  # type: ignore[arg-type]  # checked against CLASSES above
        subject=None if subject is None else _compile(name, "subject", subject),
        body=None if body is None else _compile(name, "body", body),
        headers=tuple(headers),
    )


def _snippet(match: re.Match[str]) -> str:
    text = " ".join(match.group(0).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _match(rule: Rule, view: MessageView, subject: str, text: str) -> str | None:
    found: list[str] = []
    for where, pattern, value in (("subject", rule.subject, subject), ("body", rule.body, text)):
        if pattern is not None:
            hit = pattern.search(value)
            if hit is None:
                return None
            found.append(f'{where} "{_snippet(hit)}"')
    for name, pattern in rule.headers:
        hit = next((h for v in view.header(name) if (h := pattern.search(v))), None)
        if hit is None:
            return None
        found.append(f'header {name} "{_snippet(hit)}"')
    return ", ".join(found) or None


def match_rule(rule: Rule, view: MessageView) -> str | None:
    """Why ``rule`` matches ``view`` (e.g. ``subject "leave feedback"``), or None if it does not."""
    if rule.lowered:
        return _match(rule, view, view.subject.lower(), view.text.lower())
    return _match(rule, view, view.subject, view.text)


def first_match(rules: Iterable[Rule], view: MessageView) -> tuple[Rule, str] | None:
    """The first rule in ``rules`` that matches ``view``, with why; lower-cases the text once."""
    lowered: tuple[str, str] | None = None
    for rule in rules:
        if rule.lowered:
            lowered = lowered or (view.subject.lower(), view.text.lower())
            why = _match(rule, view, *lowered)
        else:
            why = _match(rule, view, view.subject, view.text)
        if why is not None:
            return rule, why
    return None


def _topic(latin: tuple[str, ...], japanese: tuple[str, ...] = ()) -> str:
    """One pattern: Latin-script branches behind a word boundary, or Japanese branches."""
    return "(?:" + "|".join((r"\b(?:" + "|".join(latin) + ")", *japanese)) + ")"


_NEAR = r"[^.\n]{0,60}"  # in the same sentence, close by
_JA_NEAR = "[^。\n]{0,30}"
# Postal addresses only: an e-mail address that needs confirming is not a delivery problem.
_DE_ADDR = r"(?<!mail-)(?:liefer|versand)?(?:adresse|anschrift)"
_FR_ADDR = r"adresse(?!\s+(?:e-?mail|électronique|mail))"
_ES_ADDR = r"direcci[oó]n(?!\s+de\s+(?:correo|e-?mail))"
_IT_ADDR = r"indirizzo(?!\s+(?:e-?mail|di\s+posta))"

PRODUCT_SAFETY = _topic((
    r"product\s+safety\b", r"safety\s+(?:recall|notice|warning|alert|hazard)",
    r"(?:product|voluntary|safety)\s+recall", r"recall\s+notice", r"been\s+recalled\b",
    r"stop\s+using\s+(?:the|this|your)\b", r"(?:fire|choking|burn)\s+hazard",
    r"produktsicherheit", r"sicherheits(?:hinweis|warnung|rückruf)", r"rückrufaktion",
    r"produktrückruf", r"zurückgerufen", r"(?:brand|verletzungs|erstickungs)gefahr",
    r"sécurité\s+(?:du|des)\s+produits?", r"rappel\s+(?:de\s+produits?|de\s+sécurité|volontaire)",
    r"avis\s+de\s+rappel", r"risque\s+(?:d'incendie|de\s+blessure|d'étouffement)",
    r"seguridad\s+del\s+producto", r"retirada\s+(?:del\s+producto|de\s+productos?|voluntaria)",
    r"aviso\s+de\s+seguridad", r"riesgo\s+de\s+(?:incendio|lesi[oó]n|asfixia)",
    r"sicurezza\s+(?:del|dei)\s+prodott[oi]", r"avviso\s+di\s+sicurezza",
    r"richiamo\s+(?:del\s+prodotto|di\s+sicurezza|volontario)",
    r"rischio\s+di\s+(?:incendio|lesioni|soffocamento)",
), ("リコール", "製品安全", "安全上の(?:注意|お知らせ)", "自主回収", "回収のお知らせ",
    "使用を(?:中止|お控え)", "発火"))
FEEDBACK_REQUEST = _topic((
    r"(?:leave|write|post|give|share|submit)\w*\s+(?:(?:us|a|an|your|some|honest|quick)\s+)*"
    r"(?:seller\s+|product\s+|positive\s+|5[-\s]star\s+|five[-\s]star\s+)?(?:feedback|reviews?|rating)",
    r"(?:feedback|review)\s+(?:request|reminder)",
    r"how\s+(?:was|did\s+you\s+like|do\s+you\s+like)\s+your\s+(?:order|purchase|item|product)",
    r"rate\s+(?:your|the|this|our)\s+(?:purchase|product|item|order|experience|seller)",
    r"(?:5|five)[-\s]stars?\b",
    r"(?:bewertung|feedback|rezension)" + _NEAR + r"(?:abgeben|hinterlassen|schreiben|geben)",
    r"(?:hinterlassen|schreiben|abgeben)" + _NEAR + r"(?:bewertung|feedback|rezension)",
    r"bewerten\s+sie\b", r"wie\s+(?:zufrieden\s+sind\s+sie|gefällt\s+ihnen|war\s+ihre)",
    r"(?:laisser|laissez|donner|écrire|partager|déposer)\s+(?:un\s+|votre\s+)?"
    r"(?:avis|commentaire|évaluation|feedback)",
    r"votre\s+avis\s+(?:compte|nous\s+intéresse)", r"évaluer\s+(?:votre|le|notre|ce)\b",
    r"(?:dejar|deje|déjanos|escribir|dar|compartir)\w*\s+(?:una\s+|su\s+|tu\s+)?"
    r"(?:opini[oó]n|valoraci[oó]n|reseña|comentario|calificaci[oó]n|feedback)",
    r"(?:valore|valora|califique|califica)\s+(?:su|tu|el|nuestro)\b",
    r"(?:lasciare|lasci|lasciaci|lascia|scrivere|dare|condividere)\s+"
    r"(?:una\s+|un\s+|la\s+sua\s+|il\s+suo\s+)?(?:recensione|feedback|valutazione|opinione)",
), ("(?:評価|レビュー|フィードバック|ご感想|口コミ)" + _JA_NEAR
    + "(?:お願い|いただけ|頂け|ください|下さい|投稿|お寄せ)",))
MARKETING = _topic((
    r"newsletter\b", r"unsubscribe\b", r"(?:coupon|promo(?:tional)?|discount|voucher)\s+code",
    r"\d{1,2}\s*%\s*off\b", r"shop\s+now\b", r"(?:special|exclusive|limited[-\s]time)\s+offer",
    r"(?:spring|summer|autumn|fall|winter|holiday|black\s+friday|cyber\s+monday|flash|clearance)"
    r"\s+sale",
    r"gutscheincode", r"rabattcode", r"sonderangebot", r"abbestellen\b", r"\d{1,2}\s*%\s*rabatt",
    r"lettre\s+d'information", r"code\s+(?:promo|de\s+réduction)", r"soldes\b",
    r"offre\s+spéciale", r"se\s+désabonner", r"\d{1,2}\s*%\s*de\s+réduction",
    r"bolet[ií]n", r"c[oó]digo\s+(?:promocional|de\s+descuento)", r"cup[oó]n\b", r"rebajas\b",
    r"oferta\s+especial", r"darse\s+de\s+baja", r"\d{1,2}\s*%\s*de\s+descuento",
    r"codice\s+(?:sconto|promozionale|promo)", r"buono\s+sconto", r"saldi\b",
    r"offerta\s+speciale", r"disiscriv", r"\d{1,2}\s*%\s*di\s+sconto",
), ("メルマガ", "メールマガジン", "ニュースレター", "クーポン", "セール", "割引コード",
    "キャンペーン", "配信停止", r"\d{1,2}\s*[%％]\s*(?:off|オフ)"))
_STOCK_OR_DELAY = _topic((
    r"out\s+of\s+stock", r"sold\s+out", r"back-?order", r"no\s+longer\s+available", r"delay",
    r"nicht\s+(?:mehr\s+)?(?:auf\s+lager|vorrätig|lieferbar)", r"ausverkauft", r"verzöger",
    r"lieferverzöger", r"rupture\s+de\s+stock", r"épuisé", r"plus\s+disponible", r"retard",
    r"agotado", r"sin\s+stock", r"no\s+disponible", r"retraso",
    r"esaurit", r"non\s+(?:è\s+)?disponibile", r"ritardo",
), ("在庫切れ", "品切れ", "欠品", "入荷待ち", "遅延", "遅れ"))
_ALTERNATIVE = _topic((
    r"(?:alternative|similar|comparable|substitute)\s+(?:products?|items?|models?|articles?)",
    r"alternativ(?:produkt|artikel)", r"ähnliche[ns]?\s+(?:produkt|artikel)", r"ersatzartikel",
    r"(?:produit|article)s?\s+(?:alternatif|similaire|de\s+remplacement)",
    r"(?:producto|art[ií]culo)s?\s+(?:alternativo|similar)",
    r"(?:prodott|articol)[oi]\s+(?:alternativ|simil)",
), ("代替(?:品|商品)", "代わりの商品", "類似商品"))
# Both must appear somewhere: a delay notice alone may still ask the buyer to act.
ALTERNATIVE_OFFER = rf"\A(?=[\s\S]*?{_STOCK_OR_DELAY})(?=[\s\S]*?{_ALTERNATIVE})"
ADDRESS_PROBLEM = _topic((
    r"(?:confirm|verify|check|correct|update|complete|clarify)\w*\s+(?:your\s+|the\s+)?"
    r"(?:full\s+|complete\s+)?(?:shipping\s+|delivery\s+|postal\s+|mailing\s+)?address",
    r"(?<!mail\s)address\b" + _NEAR + r"\b(?:incomplete|incorrect|wrong|invalid|missing|unclear|"
    r"insufficient|undeliverable|not\s+(?:valid|complete|correct|recogni[sz]ed|found))",
    r"(?:incomplete|incorrect|wrong|invalid|unclear|undeliverable)\s+(?:shipping\s+|delivery\s+)?"
    r"address",
    r"(?:apartment|apt|suite|house|unit|flat)\s*(?:number|no\.?|#)[^.\n]{0,30}"
    r"\b(?:missing|incorrect|wrong|required|needed)",
    _DE_ADDR + _NEAR + r"(?:unvollständig|falsch|fehlerhaft|fehlt|ungültig|unklar|"
    r"nicht\s+(?:korrekt|vollständig|zustellbar))",
    r"(?:unvollständige|falsche|fehlerhafte|ungültige)\w*\s+(?:liefer|versand)?(?:adresse|anschrift)",
    r"(?:bestätigen|überprüfen|prüfen|korrigieren|vervollständigen)" + _NEAR + r"\b" + _DE_ADDR,
    _DE_ADDR + _NEAR + r"(?:bestätigen|überprüfen|korrigieren)", r"hausnummer" + _NEAR + "fehlt",
    _FR_ADDR + _NEAR + r"(?:incomplète|incorrecte|erronée|invalide|manquante|introuvable)",
    r"(?:confirmer|vérifier|corriger|compléter|préciser)" + _NEAR + r"\b" + _FR_ADDR,
    _ES_ADDR + _NEAR + r"(?:incompleta|incorrecta|err[oó]nea|inv[aá]lida|no\s+v[aá]lida)",
    r"(?:confirmar|verificar|corregir|completar)" + _NEAR + r"\b" + _ES_ADDR,
    _IT_ADDR + _NEAR + r"(?:incompleto|errato|sbagliato|non\s+valido|mancante|non\s+corretto)",
    r"(?:confermare|verificare|correggere|completare)" + _NEAR + r"\b" + _IT_ADDR,
), ("(?:住所|お届け先|配送先)" + _JA_NEAR + "(?:不備|不明|誤り|間違|不足|不完全|確認|訂正)",))
DELIVERY_SCHEDULING = _topic((
    r"(?:schedul|reschedul|arrang|book|choos|select|pick|confirm|agree)\w*\s+"
    r"(?:(?:a|an|the|your|new|another|suitable|convenient)\s+)*(?:re-?)?(?:delivery|installation)"
    r"\s+(?:date|time|slot|window|appointment|day)",
    r"(?:delivery|installation)\s+(?:slot|window|appointment)",
    r"re-?attempt\w*\s+(?:the\s+)?delivery", r"redeliver", r"missed\s+delivery",
    r"delivery\s+(?:attempt|failed|was\s+unsuccessful)", r"failed\s+delivery",
    r"(?:could\s+not|couldn't|unable\s+to)\s+(?:be\s+)?deliver",
    r"(?:heavy|bulky|oversized?)\s+(?:items?|goods|freight|parcels?|packages?|furniture)",
    r"(?:freight|pallet|curbside|kerbside|two-man|2-man)\s+delivery",
    r"(?:liefertermin|zustelltermin|anliefertermin|zeitfenster)" + _NEAR
    + r"(?:vereinbaren|abstimmen|auswählen|wählen|bestätigen|nennen|mitteilen|festlegen)",
    r"(?:vereinbaren|abstimmen|wählen|bestätigen)" + _NEAR
    + r"(?:liefertermin|zustelltermin|zeitfenster)",
    r"speditions(?:lieferung|versand|zustellung)", r"zustellversuch", r"erneute\s+zustellung",
    r"nicht\s+zugestellt\s+werden", r"sperrige[sn]?\s+(?:artikel|ware|güter|paket)",
    r"créneau\s+de\s+livraison", r"rendez-vous\s+(?:de|pour\s+la)\s+livraison",
    r"(?:choisir|sélectionner|convenir|fixer|planifier|programmer|confirmer)" + _NEAR
    + r"(?:créneau|rendez-vous|date\s+de\s+livraison)",
    r"tentative\s+de\s+livraison", r"n'a\s+pas\s+pu\s+(?:vous\s+)?être\s+livr",
    r"(?:article|colis)s?\s+(?:lourds?|volumineux|encombrants?)",
    r"(?:programar|reprogramar|concertar|acordar|elegir|seleccionar|confirmar)" + _NEAR
    + r"(?:fecha|franja|horario|cita)\s+de\s+entrega",
    r"franja\s+horaria", r"intento\s+de\s+entrega", r"art[ií]culos?\s+(?:pesados?|voluminosos?)",
    r"no\s+(?:se\s+)?(?:pudo|pudimos|hemos\s+podido)\s+entregar",
    r"(?:programmare|concordare|fissare|scegliere|selezionare|confermare)" + _NEAR
    + r"(?:data|fascia|orario|appuntamento)\s+(?:di|della|per\s+la)\s+consegna",
    r"fascia\s+oraria", r"tentativo\s+di\s+consegna",
    r"(?:non\s+è\s+stato\s+possibile|impossibile)\s+consegnare",
    r"articol[oi]\s+(?:pesant[ei]|ingombrant[ei]|voluminos[oi])",
), ("(?:配達|配送|お届け)(?:日時|日|時間|希望日)" + _JA_NEAR
    + "(?:指定|調整|選択|ご連絡|確認|ご希望|変更)",
    "再配達", "再配送", "不在", "(?:配達|お届け)(?:でき|出来)ませんでした", "大型(?:商品|家具)",
    "重量物", "搬入", "設置日"))
FULFILMENT_PROBLEM = _topic((
    r"(?:there\s+(?:is|was|has\s+been)|we\s+(?:found|noticed|encountered|have|had|ran\s+into))\s+"
    r"(?:a|an|some)\s+(?:small\s+|minor\s+|unexpected\s+)?(?:problem|issue|error|mistake)",
    r"unfortunately\b[^.\n]{0,80}\b(?:problem|issue|error|mistake)",
    r"(?:lost|damaged)\s+(?:in\s+transit|package|parcel|shipment)",
    r"(?:package|parcel|shipment)\s+(?:was|has\s+been|is)\s+(?:lost|damaged|returned\s+to)",
    r"returned\s+to\s+sender\b", r"unable\s+to\s+(?:ship|dispatch|fulfil)",
    r"cannot\s+be\s+(?:shipped|dispatched|fulfilled)",
    r"wrong\s+(?:item|product|size|colou?r)\s+(?:was\s+)?sent",
    r"customs\s+(?:information|documents?|clearance|declaration)",
    r"leider\b[^.\n]{0,80}(?:problem|fehler|schwierigkeit)",
    r"(?:ist|wurde|gab)\s+(?:es\s+)?(?:ein\s+)?(?:problem|fehler)\s+(?:mit|bei)",
    r"(?:paket|sendung)" + _NEAR + r"(?:verloren|beschädigt|unzustellbar|zurückgesendet)",
    r"falsche[nrs]?\s+(?:artikel|produkt|ware)\s+(?:geliefert|versandt|verschickt)",
    r"zoll(?:informationen|unterlagen)",
    r"(?:il\s+y\s+a\s+eu|nous\s+avons\s+rencontré|nous\s+rencontrons)\s+un\s+problème",
    r"colis\s+(?:perdu|endommagé|abîmé)", r"informations?\s+douanières?",
    r"(?:hubo|hemos\s+tenido|tenemos)\s+un\s+problema\s+con", r"paquete\s+(?:perdido|dañado)",
    r"(?:c'è\s+stato|abbiamo\s+riscontrato|si\s+è\s+verificato)\s+un\s+problema",
    r"pacco\s+(?:perso|smarrito|danneggiato)", r"documenti\s+doganali",
), ("(?:紛失|破損|誤配送|誤発送)(?:しておりました|していました|が判明|が確認され|いたしました"
    "|してしまいました)", "(?:発送|出荷)(?:でき|出来)ません", "通関"))
CUSTOMISATION = _topic((
    r"customi[sz](?:ation|ed)\b", r"personali[sz](?:ation|ed)\b", r"engrav(?:ing|ed)\b",
    r"monogram", r"custom\s+(?:design|order|text|print|size|made)",
    r"made[-\s]to[-\s](?:order|measure)", r"design\s+proof", r"proof\s+of\s+(?:your\s+)?design",
    r"personalisierung", r"personalisiert", r"gravur", r"graviert", r"sonderanfertigung",
    r"maßanfertigung", r"wunschtext", r"designvorschau",
    r"personnalis(?:é|ation)", r"gravure", r"sur[-\s]mesure", r"bon\s+à\s+tirer",
    r"personalizaci[oó]n", r"personalizad[oa]", r"grabado", r"a\s+medida", r"prueba\s+de\s+diseño",
    r"personalizzazione", r"personalizzat[oa]", r"incisione", r"su\s+misura",
    r"bozza\s+(?:del\s+)?design",
), ("名入れ", "刻印", "オーダーメイド", "カスタマイズ", "カスタム", "デザイン(?:の)?確認", "彫刻"))
REFUND_CONFIRMATION = _topic((
    r"refund\s+(?:has\s+been|was|is\s+being)\s+(?:issued|processed|completed|initiated|sent|credited)",
    r"(?:we\s+have|we've)\s+(?:issued|processed|initiated|sent)\s+(?:a|your|the)\s+"
    r"(?:full\s+|partial\s+)?refund",
    r"refund\s+confirmation", r"erstattungsbestätigung",
    r"(?:rück)?erstattung" + _NEAR
    + r"(?:veranlasst|ausgeführt|durchgeführt|erfolgt|gutgeschrieben)",
    r"remboursement\s+(?:a\s+été|est)\s+(?:effectué|émis|traité|validé)",
    r"(?:avons|nous\s+avons)\s+(?:effectué|émis|procédé\s+au)\s+(?:le\s+|votre\s+|un\s+)?"
    r"remboursement",
    r"reembolso\s+(?:ha\s+sido|fue|se\s+ha)\s+(?:emitido|procesado|realizado|efectuado|tramitado)",
    r"hemos\s+(?:emitido|procesado|realizado|tramitado)\s+(?:el|un|su|tu)\s+reembolso",
    r"rimborso\s+è\s+stato\s+(?:emesso|effettuato|elaborato)",
    r"abbiamo\s+(?:emesso|effettuato|elaborato)\s+(?:il|un)\s+rimborso",
), ("返金(?:処理)?(?:が|を)?(?:完了|済み|いたしました|しました)",))
RETURN_QUESTION = _topic((
    r"return\s+(?:request|label|authori[sz]ation|shipping|reason)", r"rma\b",
    r"(?:return|send)\s+(?:the|this|your)\s+(?:item|product|order|unit)\s+(?:back|to\s+us)",
    r"send\s+(?:it|them)\s+back\b", r"return\s+(?:and|or)\s+(?:refund|replacement|exchange)",
    r"rücksende(?:etikett|schein|nummer|label|anfrage|grund)",
    r"rückgabe(?:anfrage|antrag|grund|etikett)", r"retouren?(?:schein|label|anfrage|nummer)",
    r"ihre[rn]?\s+(?:rücksendung|retoure|rückgabe)", r"zurück(?:senden|schicken)",
    r"(?:votre|la)\s+(?:demande\s+de\s+)?retour\b", r"étiquette\s+de\s+retour",
    r"autorisation\s+de\s+retour", r"demande\s+d'échange",
    r"(?:renvoyer|retourner)\s+(?:l'article|le\s+produit|le\s+colis)",
    r"(?:su|tu|la)\s+(?:solicitud\s+de\s+)?devoluci[oó]n", r"etiqueta\s+de\s+devoluci[oó]n",
    r"devolver\s+(?:el|la)\s+(?:art[ií]culo|producto|paquete)",
    r"richiesta\s+di\s+reso", r"etichetta\s+(?:di|per\s+il)\s+reso",
    r"autorizzazione\s+(?:al|di)\s+reso", r"(?:il\s+suo|il\s+tuo|il)\s+reso\b",
    r"restituire\s+(?:l'articolo|il\s+prodotto|il\s+pacco)",
), ("返品", "交換"))
INVOICE = _topic((
    r"invoice\b", r"(?:tax|vat)\s+receipt", r"credit\s+note",
    r"\w*rechnung(?!s?(?:adresse|anschrift))", r"facture\b", r"factura\b", r"fattura\b",
), ("請求書", "領収書", "インボイス"))
CONFIRMATION = _topic((
    r"(?:order|purchase)\s+(?:confirmation|confirmed|is\s+confirmed|has\s+been\s+"
    r"(?:received|confirmed|placed))",
    r"(?:has|have)\s+(?:been\s+)?(?:shipped|dispatched)", r"(?:is|are)\s+on\s+(?:its|their)\s+way",
    r"(?:shipping|shipment|dispatch|delivery)\s+(?:confirmation|notification)",
    r"(?:has|have|was|were)\s+(?:been\s+)?delivered\b", r"out\s+for\s+delivery",
    r"tracking\s+(?:number|code|id|link|information)",
    r"(?:bestell|versand|liefer|auftrags)bestätigung", r"sendungs(?:nummer|verfolgung)",
    r"(?:wurde|wurden|ist|sind)\s+(?:heute\s+)?(?:versandt|versendet|verschickt|zugestellt|geliefert)",
    r"confirmation\s+de\s+(?:commande|l'expédition|livraison)",
    r"(?:a|ont)\s+été\s+(?:expédié|livré)",
    r"est\s+en\s+(?:route|chemin)", r"numéro\s+de\s+suivi",
    r"confirmaci[oó]n\s+del?\s+(?:pedido|env[ií]o|entrega)",
    r"(?:ha|han)\s+sido\s+(?:enviad|entregad)",
    r"est[aá]\s+en\s+camino", r"n[uú]mero\s+de\s+seguimiento",
    r"conferma\s+(?:dell'ordine|d'ordine|di\s+spedizione|di\s+consegna|ordine)",
    r"(?:è|sono)\s+stat[oaie]\s+(?:spedit|consegnat)", r"è\s+in\s+viaggio",
    r"numero\s+di\s+tracciamento",
), ("(?:ご注文|注文)(?:の)?(?:確認|受付|を承りました)",
    "(?:発送|出荷)(?:いたしました|しました|完了|のお知らせ|のご案内)",
    "(?:お届け|配達)(?:完了|しました|いたしました)", "追跡番号"))
THANK_YOU = _topic((
    r"thank(?:s|\s+you)\s+(?:so\s+much\s+)?for\s+(?:your\s+)?"
    r"(?:order|purchase|business|shopping|choosing|buying)",
    r"(?:dank|danke)\s+für\s+(?:ihre[n]?|deine[n]?|den)\s+"
    r"(?:einkauf|bestellung|kauf|auftrag|vertrauen)",
    r"merci\s+(?:beaucoup\s+)?(?:pour|de)\s+(?:votre|ton)\s+(?:commande|achat|confiance)",
    r"merci\s+d'avoir\s+(?:commandé|acheté|choisi)",
    r"gracias\s+(?:por\s+)?(?:su|tu)\s+(?:pedido|compra|confianza)",
    r"gracias\s+por\s+(?:comprar|elegir)",
    r"grazie\s+(?:mille\s+)?(?:per\s+)?(?:il\s+suo\s+|il\s+tuo\s+|l')(?:ordine|acquisto)",
    r"grazie\s+per\s+aver(?:e)?\s+(?:acquistato|scelto|ordinato)",
), ("(?:お買い上げ|ご購入|ご注文|お買い物)[^。\n]{0,10}ありがと",))
PROACTIVE_SERVICE = _topic((
    r"user\s+manual", r"(?:user|instruction|setup|quick[-\s]start)\s+guide",
    r"tips?\s+(?:for|on)\s+(?:using|getting|how)", r"how\s+to\s+get\s+the\s+most",
    r"faqs?\b", r"frequently\s+asked\s+questions", r"here\s+to\s+help\b", r"care\s+instructions",
    r"(?:bedienungs|gebrauchs)anleitung", r"handbuch", r"häufig\s+gestellte\s+fragen",
    r"pflegehinweise", r"mode\s+d'emploi", r"(?:notice|guide)\s+d'utilisation", r"astuces",
    r"questions\s+fréquentes", r"instrucciones\s+de\s+uso",
    r"gu[ií]a\s+de\s+(?:uso|usuario|inicio)",
    r"preguntas\s+frecuentes", r"istruzioni\s+(?:per\s+l'uso|d'uso)",
    r"guida\s+(?:utente|rapida|all'uso)", r"domande\s+frequenti",
), ("取扱説明書", "取り扱い説明書", "マニュアル", "使い方", "よくある質問"))

# (short name, class, pattern) in precedence order; see the module docstring.
_TOPICS: tuple[tuple[str, RuleClass, str], ...] = (
    ("product-safety", "critical", PRODUCT_SAFETY),
    ("feedback-request", "non-critical", FEEDBACK_REQUEST),
    ("marketing", "non-critical", MARKETING),
    ("alternative-offer", "non-critical", ALTERNATIVE_OFFER),
    ("address-problem", "critical", ADDRESS_PROBLEM),
    ("delivery-scheduling", "critical", DELIVERY_SCHEDULING),
    ("fulfilment-problem", "critical", FULFILMENT_PROBLEM),
    ("customisation", "critical", CUSTOMISATION),
    ("refund-confirmation", "non-critical", REFUND_CONFIRMATION),
    ("return-question", "critical", RETURN_QUESTION),
    ("invoice", "critical", INVOICE),
    ("confirmation", "non-critical", CONFIRMATION),
    ("thank-you", "non-critical", THANK_YOU),
    ("proactive-service", "non-critical", PROACTIVE_SERVICE),
)


def _builtin_rules() -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for short, cls, pattern in _TOPICS:
        name = f"builtin:{short}"
        compiled = _compile(name, "built-in", pattern, flags=0)
        rules.append(Rule(name, cls, subject=compiled, lowered=True))
        rules.append(Rule(name, cls, body=compiled, lowered=True))
        if short == "alternative-offer":  # "Delivery delayed" as subject, the offer in the body
            rules.append(Rule(name, cls, subject=re.compile(_STOCK_OR_DELAY),
                              body=re.compile(_ALTERNATIVE), lowered=True))
        if short == "marketing":  # bulk-mail headers: one message to many, never order-critical
            bulk = r"^\s*(?:bulk|list|junk)\b"
            rules.append(compile_rule(name, cls, header={"List-Unsubscribe": "."}))
            rules.append(compile_rule(name, cls, header={"Precedence": bulk}))
    return tuple(rules)


BUILTIN_RULES: tuple[Rule, ...] = _builtin_rules()
