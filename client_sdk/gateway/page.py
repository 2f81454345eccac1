"""The gateway's local page (`GET /`, loopback only): the last requests with their private spans highlighted, and
the budget left per key. Rendered on the server side with Jinja2 (autoescaped); no script."""

from __future__ import annotations

import datetime

import jinja2

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>veil gateway</title>
<style>
 body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; max-width: 70em; }
 h1 { font-size: 1.35em; margin-bottom: .2em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
 table { border-collapse: collapse; } td, th { padding: .25em .8em; border-bottom: 1px solid #ddd; text-align: left; }
 .num { text-align: right; font-variant-numeric: tabular-nums; }
 .req { border: 1px solid #ccc; border-radius: 6px; padding: .6em .9em; margin: .8em 0; }
 .meta { color: #555; font-size: .92em; } .role { font-weight: 600; display: inline-block; min-width: 6em; }
 .noise { background: #ffd7d7; border-bottom: 2px solid #c33; }
 .placeholder { background: #d9e8ff; border-bottom: 2px solid #36c; }
 .public { background: #eef7ee; } .ph-name { font-family: monospace; color: #235; }
 .status-ok { color: #1a7f37; } .status-bad { color: #b42318; font-weight: 600; }
 .answer { white-space: pre-wrap; color: #333; } .legend span { padding: 0 .4em; margin-right: .6em; }
</style></head><body>
<h1>veil gateway</h1>
<div class="meta">mode <b>{{ mode }}</b> &middot; {{ "gateway keys required" if keyed else "no gateway keys: loopback only, budget key from the `user` field" }}
&middot; this page is served to this machine only and refreshes every 10 s</div>
<p class="legend"><span class="noise">noised: only DEL levels left the device</span>
<span class="placeholder">replaced: the server saw only the placeholder</span>
<span class="public">sent in the clear</span> (the chat template's own text is always public)</p>
<h2>Budget per key</h2>
{% if budgets %}<table id="budgets"><tr><th>budget key</th><th class="num">epsilon spent (composed)</th>
<th class="num">cap</th><th class="num">left</th><th class="num">charges</th><th class="num">private tokens</th></tr>
{% for b in budgets %}<tr><td>{{ b.key }}</td><td class="num">{{ "%.4g"|format(b.spent) }}</td>
<td class="num">{{ "%.4g"|format(b.total) if b.total is not none else "none" }}</td>
<td class="num">{{ "%.4g"|format(b.left) if b.left is not none else "unlimited" }}</td>
<td class="num">{{ b.charges }}</td><td class="num">{{ b.tokens }}</td></tr>{% endfor %}</table>
{% else %}<p>No requests yet{% if not ledger %} (the ledger is off){% endif %}.</p>{% endif %}
<h2>Last requests</h2>
{% for e in exchanges %}<div class="req">
<div class="meta">{{ e.when }} &middot; key <b>{{ e.budget_key }}</b> &middot; {{ "stream" if e.stream else "single" }}
&middot; <span class="{{ 'status-ok' if e.status == 'ok' else 'status-bad' }}">{{ e.status }}</span>
{% if e.privacy %}&middot; epsilon <b>{{ "%.4g"|format(e.privacy.epsilon) }}</b> ({{ e.privacy.private_tokens }} private
tokens at {{ "%.4g"|format(e.privacy.epsilon_per_token) }} each, {{ e.privacy.public_tokens }} public, delta {{ e.privacy.delta }}){% endif %}</div>
{% for role, parts in e.messages %}<div><span class="role">{{ role }}</span>
{%- for treatment, text, name in parts -%}
{%- if treatment == "placeholder" -%}<span class="placeholder" title="replaced by {{ name }}">{{ text }}</span> <span class="ph-name">&rarr; {{ name }}</span>
{%- else -%}<span class="{{ treatment }}">{{ text }}</span>{%- endif -%}
{%- endfor %}</div>{% endfor %}
{% if e.answer %}<div><span class="role">answer</span><span class="answer">{{ e.answer }}</span></div>{% endif %}
</div>{% else %}<p>No requests yet.</p>{% endfor %}
</body></html>
"""
_TEMPLATE = jinja2.Environment(autoescape=True).from_string(TEMPLATE)


def render_page(exchanges: list, budgets: list[dict], mode: str, keyed: bool, ledger: bool = True) -> str:
    """The page for these exchanges (newest first) and budgets."""
    rows = [{**vars(e), "when": datetime.datetime.fromtimestamp(e.time).strftime("%H:%M:%S")} for e in exchanges]
    return _TEMPLATE.render(exchanges=rows, budgets=budgets, mode=mode, keyed=keyed, ledger=ledger)
