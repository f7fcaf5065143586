// tollgate dashboard: reads the admin JSON API (docs/api.md) and draws it.
// No library and nothing inline (the page runs under `default-src 'self'`):
// the DOM is built with h()/svg() below, text always as text nodes.
'use strict';

(() => {
  const TOKEN_KEY = 'tollgate.adminToken';
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const BY = ['release', 'model', 'tool', 'request_type'];
  // Window → the burn-rate chart's buckets (each one /api/segments query).
  const WINDOWS = {
    '1h': { ms: 3600e3, buckets: 30 },
    '24h': { ms: 86400e3, buckets: 24 },
    '7d': { ms: 7 * 86400e3, buckets: 28 },
  };
  const PALETTE = ['#2563eb', '#db2777', '#0891b2', '#7c3aed', '#ca8a04'];
  const REFRESH_MS = 30000;
  const SIGNALS = {
    more_tokens_per_run: 'More tokens per run',
    over_tooling: 'Over-tooling',
    prompt_or_reasoning_regression: 'Prompt or reasoning regression',
    unit_cost_regression: 'Unit-cost regression',
    tail_runs_accelerating_spend: 'Tail runs accelerating spend',
  };
  const COMPARE_FIELDS = [
    ['runs', 'Runs', 'count', 0],
    ['cost_per_run', 'Cost per run', 'usd', 1],
    ['cost_p95', 'Cost p95', 'usd', 1],
    ['llm_cost_per_run', 'LLM cost per run', 'usd', 1],
    ['tool_cost_per_run', 'Tool cost per run', 'usd', 1],
    ['tokens_per_run', 'Tokens per run', 'count', 1],
    ['calls_per_run', 'Calls per run', 'dec', 1],
    ['retries_per_run', 'Retries per run', 'dec', 1],
    ['burn_rate_usd_per_hour', 'Burn rate (USD/h)', 'usd', 1],
  ];

  // ---------- DOM helpers ----------

  function fill(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'css') for (const [p, pv] of Object.entries(v)) el.style.setProperty(p, pv);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    return el;
  }

  function h(tag, attrs, ...children) {
    return fill(setAttrs(document.createElement(tag), attrs), children);
  }

  function svg(tag, attrs, ...children) {
    return fill(setAttrs(document.createElementNS(SVG_NS, tag), attrs), children);
  }

  // ---------- formatting ----------

  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

  function usd(v) {
    if (!isNum(v)) return '–';
    const a = Math.abs(v);
    const sign = v < 0 ? '-' : '';
    if (a === 0) return '$0';
    if (a >= 1000) return sign + '$' + Math.round(a).toLocaleString('en-US');
    if (a >= 1) return sign + '$' + a.toFixed(2);
    if (a >= 0.0001) return sign + '$' + a.toFixed(4);
    return sign + '$' + Number(a.toPrecision(2)).toFixed(8).replace(/0+$/, '');
  }

  function count(v) {
    if (!isNum(v)) return '–';
    return Math.abs(v) >= 100 || Number.isInteger(v)
      ? Math.round(v).toLocaleString('en-US')
      : v.toFixed(1);
  }

  const dec = (v) => (isNum(v) ? v.toFixed(2) : '–');
  const pct = (v) => (isNum(v) ? (v * 100).toFixed(v > 0 && v < 0.1 ? 1 : 0) + '%' : '–');
  const FORMATS = { usd, count, dec };

  function ms(v) {
    if (!isNum(v)) return '–';
    if (v < 1000) return Math.round(v) + ' ms';
    if (v < 60000) return (v / 1000).toFixed(1) + ' s';
    return (v / 60000).toFixed(1) + ' min';
  }

  const pad = (n) => String(n).padStart(2, '0');

  function clock(t, withDate) {
    const d = new Date(t);
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return withDate ? `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}` : time;
  }

  function dateTime(t) {
    if (!isNum(t)) return '–';
    return clock(t, true) + ':' + pad(new Date(t).getSeconds());
  }

  function ago(t) {
    if (!isNum(t)) return '–';
    const s = Math.max(0, (Date.now() - t) / 1000);
    if (s < 60) return Math.round(s) + ' s ago';
    if (s < 3600) return Math.round(s / 60) + ' min ago';
    if (s < 86400) return (s / 3600).toFixed(1) + ' h ago';
    return (s / 86400).toFixed(1) + ' d ago';
  }

  // RFC 3339 without milliseconds, as the API takes it.
  const iso = (t) => new Date(t).toISOString().replace(/\.\d{3}Z$/, 'Z');

  const keyLabel = (key) => Object.values(key || {}).map((v) => (v === null || v === '' ? '(none)' : v)).join(' · ');

  function statusPill(status, reasons) {
    const title = reasons && reasons.length ? reasons.join('\n') : status === 'ok' ? 'within every configured threshold' : null;
    return h('span', { class: `pill s-${status || 'none'}`, title }, status || '–');
  }

  function runStatusPill(status) {
    return h('span', { class: `pill r-${status || 'none'}` }, status || '–');
  }

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  const token = () => sessionStorage.getItem(TOKEN_KEY) || '';

  async function api(path, params) {
    const url = new URL(path, location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== null && v !== undefined && v !== '') url.searchParams.set(k, v);
    }
    const headers = { Accept: 'application/json' };
    if (token()) headers.Authorization = 'Bearer ' + token();
    let response;
    try {
      response = await fetch(url, { headers, cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, `cannot reach ${url.pathname}: ${e.message}`);
    }
    if (response.status === 401) {
      askForToken(!!token());
      throw new ApiError(401, 'the admin API needs a bearer token');
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const reason = body && body.error ? body.error : response.statusText;
      throw new ApiError(response.status, `${url.pathname}: ${response.status} ${reason}`);
    }
    return body;
  }

  // Runs `tasks` (functions returning promises), `limit` at a time.
  async function pool(tasks, limit) {
    const results = new Array(tasks.length);
    let next = 0;
    const worker = async () => {
      while (next < tasks.length) {
        const i = next++;
        results[i] = await tasks[i]();
      }
    };
    await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
    return results;
  }

  // ---------- token ----------

  function askForToken(wasWrong) {
    const form = document.getElementById('token-form');
    form.hidden = false;
    notice(
      wasWrong
        ? 'The admin token was refused. Enter the value of the variable named by admin.token_env.'
        : 'The admin API needs a bearer token (admin.token_env is set). Enter it above; it is kept for this browser tab only.',
    );
    document.getElementById('token-input').focus();
  }

  function notice(text) {
    const el = document.getElementById('notice');
    el.textContent = text || '';
    el.hidden = !text;
  }

  function setupToken() {
    const form = document.getElementById('token-form');
    const clear = document.getElementById('token-clear');
    clear.hidden = !token();
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const input = document.getElementById('token-input');
      const value = input.value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      input.value = '';
      form.hidden = true;
      clear.hidden = false;
      notice('');
      route();
    });
    clear.addEventListener('click', () => {
      sessionStorage.removeItem(TOKEN_KEY);
      clear.hidden = true;
      route();
    });
  }

  // ---------- routing ----------

  const app = () => document.getElementById('app');
  let generation = 0;
  let refreshTimer = null;

  function hashParams() {
    return new URLSearchParams(location.hash.replace(/^#/, ''));
  }

  function hashFor(params) {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined) p.set(k, v);
    return '#' + p.toString().replace(/=(&|$)/g, '$1');
  }

  async function route() {
    const gen = ++generation;
    clearTimeout(refreshTimer);
    document.body.dataset.state = 'loading';
    const p = hashParams();
    let view = 'overview';
    try {
      if (p.get('run')) {
        view = 'run';
        await runView(gen, p.get('run'), p.get('started_ms'));
      } else if (p.has('compare')) {
        view = 'compare';
        await compareView(gen, p.get('base'), p.get('head'), windowParam(p, '7d'));
      } else {
        const by = BY.includes(p.get('by')) ? p.get('by') : 'release';
        await overview(gen, by, windowParam(p, '24h'), p.get('until'));
      }
    } catch (e) {
      if (gen !== generation) return;
      app().replaceChildren(errorBox(e));
    }
    if (gen !== generation) return;
    for (const a of document.querySelectorAll('nav a')) {
      a.classList.toggle('active', a.dataset.view === view);
    }
    document.getElementById('updated').textContent = 'updated ' + dateTime(Date.now()).slice(11);
    document.body.dataset.view = view;
    document.body.dataset.state = 'ready';
    if (view !== 'compare') {
      refreshTimer = setTimeout(() => {
        if (document.visibilityState === 'visible' && gen === generation) route();
      }, REFRESH_MS);
    }
  }

  const windowParam = (p, fallback) => (WINDOWS[p.get('since')] ? p.get('since') : fallback);

  function errorBox(e) {
    return h('div', { class: 'error' }, e && e.message ? e.message : String(e));
  }

  function panel(title, attrs, ...body) {
    return h('section', Object.assign({ class: 'panel' }, attrs), h('h2', null, title), ...body);
  }

  // A panel whose body arrives later; errors stay inside the panel.
  async function settle(target, promise) {
    try {
      const content = await promise;
      target.classList.remove('loading');
      target.replaceChildren(...[content].flat());
    } catch (e) {
      target.replaceChildren(errorBox(e));
    }
  }

  function segmented(options, current, hrefFor) {
    return h(
      'div',
      { class: 'segmented' },
      options.map(([value, label]) =>
        h('a', { href: hrefFor(value), class: value === current ? 'on' : null }, label),
      ),
    );
  }

  // ---------- overview ----------

  async function overview(gen, by, since, until) {
    const win = WINDOWS[since];
    const untilMs = until ? Date.parse(until) : null;
    const range = isNum(untilMs)
      ? { since: iso(untilMs - win.ms), until: iso(untilMs) }
      : { since, until: null };
    const link = (over) => hashFor(Object.assign({ by, since, until: until || null }, over));

    const segBox = h('div', { class: 'loading' }, 'loading…');
    const kpiBox = h('div', { class: 'kpis' });
    const chartBox = h('div', { class: 'loading' }, 'loading…');
    const barsBox = h('div', { class: 'loading' }, 'loading…');
    const runsBox = h('div', { class: 'loading' }, 'loading…');

    const controls = h(
      'div',
      { class: 'controls' },
      h('span', { class: 'label' }, 'Group by'),
      segmented(BY.map((b) => [b, b.replace('_', ' ')]), by, (b) => link({ by: b })),
      h('span', { class: 'label' }, 'Window'),
      segmented(Object.keys(WINDOWS).map((w) => [w, w]), since, (w) => link({ since: w })),
      until ? h('span', { class: 'muted' }, `ending ${until}`) : null,
    );

    const page = [
      controls,
      kpiBox,
      panel(`Segments by ${by.replace('_', ' ')}`, { id: 'segments' }, segBox),
      h(
        'div',
        { class: 'grid2' },
        panel('Burn rate over time (USD/hour)', { id: 'burn' }, chartBox),
        panel('Cost per run and p95 by release', { id: 'per-release' }, barsBox),
      ),
      panel('Most expensive runs', { id: 'top-runs' }, runsBox),
    ];
    if (gen !== generation) return;
    app().replaceChildren(...page);

    const byRelease = api('/api/segments', Object.assign({ by: 'release', limit: 1000 }, range));
    const segments = by === 'release' ? byRelease : api('/api/segments', Object.assign({ by, limit: 1000 }, range));
    await Promise.all([
      settle(segBox, segments.then((d) => segmentsTable(d, by, range))),
      settle(kpiBox, byRelease.then(kpis)),
      settle(barsBox, byRelease.then(releaseBars)),
      settle(chartBox, burnChart(since, untilMs)),
      settle(
        runsBox,
        api('/api/runs', Object.assign({ sort: 'cost', limit: 10 }, range)).then(topRuns),
      ),
    ]);
  }

  function kpis(data) {
    const segs = data.segments || [];
    const runs = segs.reduce((a, s) => a + (s.runs || 0), 0);
    const spent = segs.reduce((a, s) => a + (s.cost_usd || 0), 0);
    const perRun = runs ? segs.reduce((a, s) => a + (s.cost_per_run || 0) * (s.runs || 0), 0) / runs : null;
    const burn = segs.reduce((a, s) => a + (s.burn_rate_usd_per_hour || 0), 0);
    const rank = { ok: 0, warning: 1, critical: 2 };
    const worst = segs.reduce((w, s) => ((rank[s.status] || 0) > (rank[w] || 0) ? s.status : w), 'ok');
    const flagged = segs.filter((s) => s.status && s.status !== 'ok').length;
    const kpi = (label, value, extra) => h('div', { class: 'kpi' }, h('div', { class: 'kpi-label' }, label), h('div', { class: 'kpi-value' }, value), extra ? h('div', { class: 'kpi-extra' }, extra) : null);
    return [
      kpi('Spend in window', usd(spent)),
      kpi('Runs ended', count(runs)),
      kpi('Cost per run', usd(perRun)),
      kpi('Burn rate', usd(burn) + '/h'),
      kpi('Releases', h('span', null, statusPill(segs.length ? worst : null)), flagged ? `${flagged} of ${segs.length} flagged` : `${segs.length} in window`),
    ];
  }

  function splitBar(llm, tool) {
    const total = (llm || 0) + (tool || 0);
    const l = total ? (llm / total) * 100 : 0;
    return h(
      'div',
      { class: 'split', title: `LLM ${pct(total ? llm / total : null)} · tool ${pct(total ? tool / total : null)}` },
      h('span', { class: 'split-llm', css: { width: l + '%' } }),
      h('span', { class: 'split-tool', css: { width: 100 - l + '%' } }),
    );
  }

  function segmentsTable(data, by, range) {
    const segs = (data.segments || []).slice();
    if (!segs.length) return h('p', { class: 'empty' }, 'No calls in this window.');
    segs.sort((a, b) => (b.cost_usd || 0) - (a.cost_usd || 0));
    const num = (field, value, fmt) => h('td', { class: 'num', 'data-field': field, 'data-value': isNum(value) ? value : '' }, fmt(value));
    return h(
      'table',
      {
        id: 'segments-table',
        class: 'data',
        'data-by': by,
        'data-since': data.since || range.since,
        'data-until': data.until || range.until || '',
      },
      h(
        'thead',
        null,
        h(
          'tr',
          null,
          h('th', null, by.replace('_', ' ')),
          h('th', { class: 'num' }, 'runs'),
          h('th', { class: 'num' }, 'cost / run'),
          h('th', { class: 'num' }, 'p95'),
          h('th', { class: 'num' }, 'burn / h'),
          h('th', { class: 'num' }, 'per 1k runs'),
          h('th', null, 'LLM / tool'),
          h('th', { class: 'num' }, 'estimated'),
          h('th', null, 'status'),
        ),
      ),
      h(
        'tbody',
        null,
        segs.map((s) =>
          h(
            'tr',
            { 'data-key': JSON.stringify(s.key || {}), class: `row-${s.status || 'none'}` },
            h('td', { class: 'key', 'data-field': 'key' }, by === 'release' && s.key && s.key.release ? h('a', { href: hashFor({ compare: '', head: s.key.release }) , title: 'compare this release' }, keyLabel(s.key)) : keyLabel(s.key)),
            num('runs', s.runs, count),
            num('cost_per_run', s.cost_per_run, usd),
            num('cost_p95', s.cost_p95, usd),
            num('burn_rate_usd_per_hour', s.burn_rate_usd_per_hour, usd),
            num('cost_per_1k_runs', s.cost_per_1k_runs, usd),
            h(
              'td',
              { class: 'split-cell', 'data-field': 'llm_share', 'data-value': s.llm_share },
              splitBar(s.llm_cost_usd, s.tool_cost_usd),
              h('span', { class: 'split-text' }, `${pct(s.llm_share)} / ${pct(s.tool_share)}`),
            ),
            num('estimated_share', s.estimated_share, pct),
            h('td', { 'data-field': 'status', 'data-value': s.status }, statusPill(s.status, s.reasons)),
          ),
        ),
      ),
    );
  }

  function releaseBars(data) {
    const segs = (data.segments || []).filter((s) => (s.runs || 0) > 0);
    if (!segs.length) return h('p', { class: 'empty' }, 'No ended runs in this window.');
    segs.sort((a, b) => keyLabel(a.key).localeCompare(keyLabel(b.key)));
    const max = Math.max(...segs.map((s) => Math.max(s.cost_p95 || 0, s.cost_per_run || 0))) || 1;
    const bar = (cls, value, label) =>
      h(
        'div',
        { class: 'bar-line' },
        h('span', { class: 'bar-label' }, label),
        h('div', { class: 'bar-track' }, h('span', { class: `bar ${cls}`, css: { width: ((value || 0) / max) * 100 + '%' } })),
        h('span', { class: 'bar-value' }, usd(value)),
      );
    return [
      h(
        'div',
        { class: 'bars' },
        segs.map((s) =>
          h(
            'div',
            { class: 'bar-group', 'data-key': JSON.stringify(s.key || {}) },
            h('div', { class: 'bar-title' }, keyLabel(s.key), ' ', statusPill(s.status, s.reasons), h('span', { class: 'muted' }, ` ${count(s.runs)} runs`)),
            bar('mean', s.cost_per_run, 'per run'),
            bar('p95', s.cost_p95, 'p95'),
          ),
        ),
      ),
      h('div', { class: 'legend' }, h('span', { class: 'swatch mean' }), 'mean cost per run', h('span', { class: 'swatch p95' }), 'p95 (nearest rank)'),
    ];
  }

  // Burn rate per release over consecutive windows: one /api/segments query
  // per bucket, each bucket's burn_rate_usd_per_hour is its spend / its hours.
  async function burnChart(since, untilMs) {
    const win = WINDOWS[since];
    const end = isNum(untilMs) ? untilMs : Date.now();
    const step = win.ms / win.buckets;
    const starts = Array.from({ length: win.buckets }, (_, i) => end - win.ms + i * step);
    const answers = await pool(
      starts.map((s) => () => api('/api/segments', { by: 'release', limit: 1000, since: iso(s), until: iso(s + step) })),
      6,
    );
    const series = new Map();
    const total = new Array(starts.length).fill(0);
    answers.forEach((a, i) => {
      for (const seg of a.segments || []) {
        const name = keyLabel(seg.key);
        if (!series.has(name)) series.set(name, { name, values: new Array(starts.length).fill(0), spend: 0 });
        const s = series.get(name);
        s.values[i] = seg.burn_rate_usd_per_hour || 0;
        s.spend += seg.cost_usd || 0;
        total[i] += seg.burn_rate_usd_per_hour || 0;
      }
    });
    const lines = [...series.values()].sort((a, b) => b.spend - a.spend).slice(0, PALETTE.length);
    lines.forEach((l, i) => (l.color = PALETTE[i]));
    if (series.size > 1) lines.unshift({ name: 'all releases', values: total, color: '#111827', total: true });
    if (!lines.length) return h('p', { class: 'empty' }, 'No spend in this window.');
    return lineChart(starts.map((s) => s + step), lines, step, win.ms > 86400e3);
  }

  function lineChart(xs, lines, step, withDate) {
    const W = 640, H = 220, L = 64, R = 12, T = 12, B = 28;
    const max = Math.max(...lines.flatMap((l) => l.values)) || 1;
    const x = (i) => L + (xs.length > 1 ? (i / (xs.length - 1)) * (W - L - R) : 0);
    const y = (v) => T + (1 - v / max) * (H - T - B);
    const parts = [];
    for (const f of [0, 0.5, 1]) {
      parts.push(svg('line', { x1: L, x2: W - R, y1: y(max * f), y2: y(max * f), class: 'grid' }));
      parts.push(svg('text', { x: L - 6, y: y(max * f) + 4, class: 'axis', 'text-anchor': 'end' }, usd(max * f)));
    }
    for (const i of [0, Math.floor((xs.length - 1) / 2), xs.length - 1]) {
      parts.push(svg('text', { x: x(i), y: H - 8, class: 'axis', 'text-anchor': i === 0 ? 'start' : i === xs.length - 1 ? 'end' : 'middle' }, i === xs.length - 1 && Math.abs(xs[i] - Date.now()) < 60000 ? 'now' : clock(xs[i], withDate)));
    }
    for (const line of lines.slice().reverse()) {
      const d = line.values.map((v, i) => `${i ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join('');
      parts.push(svg('path', { d, class: line.total ? 'series total' : 'series', stroke: line.color }));
      line.values.forEach((v, i) => {
        if (v > 0) {
          parts.push(svg('circle', { cx: x(i), cy: y(v), r: line.total ? 3 : 2.5, fill: line.color }, svg('title', null, `${line.name}: ${usd(v)}/h, ${clock(xs[i] - step, withDate)}–${clock(xs[i], withDate)}`)));
        }
      });
    }
    return [
      svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': 'burn rate over time' }, parts),
      h('div', { class: 'legend' }, lines.map((l) => [h('span', { class: 'swatch', css: { background: l.color } }), l.name])),
      h('p', { class: 'note' }, `Each point: spend in one ${ms(step)} slice of the window ÷ its hours.`),
    ];
  }

  function runLink(run) {
    return hashFor({ run: run.run_id, started_ms: isNum(run.started_ms) ? run.started_ms : null });
  }

  function topRuns(data) {
    const runs = data.runs || [];
    if (!runs.length) return h('p', { class: 'empty' }, 'No runs in this window.');
    return h(
      'table',
      { id: 'top-runs-table', class: 'data' },
      h('thead', null, h('tr', null, ['run', 'release', 'type', 'status', 'stop reason', 'cost', 'of ceiling', 'calls', 'retries', 'started'].map((c, i) => h('th', { class: [5, 7, 8].includes(i) ? 'num' : null }, c)))),
      h(
        'tbody',
        null,
        runs.map((r) =>
          h(
            'tr',
            { 'data-run': r.run_id, class: r.breached ? 'row-critical' : null },
            h('td', { class: 'key' }, h('a', { href: runLink(r) }, r.run_id)),
            h('td', null, r.release || '–'),
            h('td', null, r.request_type || '–'),
            h('td', null, runStatusPill(r.status)),
            h('td', null, r.stop_reason || '–'),
            h('td', { class: 'num strong' }, usd(r.cost_usd)),
            h('td', null, ceilingBar(r.cost_usd, r.ceiling_usd, r.breached)),
            h('td', { class: 'num' }, count(r.calls)),
            h('td', { class: 'num' }, count(r.retries)),
            h('td', { title: r.started_at || '' }, ago(r.started_ms)),
          ),
        ),
      ),
    );
  }

  function ceilingBar(cost, ceiling, breached) {
    if (!isNum(ceiling) || ceiling <= 0) return h('span', { class: 'muted' }, 'no ceiling');
    const share = Math.min(1, (cost || 0) / ceiling);
    return h(
      'div',
      { class: 'ceiling', title: `${usd(cost)} of ${usd(ceiling)}` },
      h('div', { class: 'bar-track small' }, h('span', { class: `bar ${breached || share >= 0.999 ? 'over' : share > 0.8 ? 'near' : 'mean'}`, css: { width: share * 100 + '%' } })),
      h('span', { class: 'muted' }, usd(ceiling)),
    );
  }

  // ---------- one run ----------

  async function runView(gen, runId, startedMs) {
    const first = await api('/api/runs/' + encodeURIComponent(runId), { started_ms: startedMs, limit: 1000 });
    const calls = (first.calls || []).slice();
    while (isNum(first.total) && calls.length < first.total && calls.length < 10000) {
      const more = await api('/api/runs/' + encodeURIComponent(runId), { started_ms: startedMs, limit: 1000, offset: calls.length });
      if (!more.calls || !more.calls.length) break;
      calls.push(...more.calls);
    }
    if (gen !== generation) return;
    const run = first.run || {};
    const t = run.tokens || {};
    const item = (label, value) => h('div', { class: 'item' }, h('dt', null, label), h('dd', null, value));
    const duration = isNum(run.ended_ms) && isNum(run.started_ms) ? ms(run.ended_ms - run.started_ms) : 'still running';
    app().replaceChildren(
      h('p', { class: 'crumbs' }, h('a', { href: '#' }, '← overview'), run.release ? [' · ', h('a', { href: hashFor({ compare: '', head: run.release }) }, `compare ${run.release}`)] : null),
      h('h1', { class: 'run-title' }, 'Run ', h('code', null, run.run_id || runId), ' ', runStatusPill(run.status), run.breached ? h('span', { class: 'pill s-critical' }, 'ceiling breached') : null),
      h(
        'div',
        { class: 'grid2 run-head' },
        panel(
          'Summary',
          { id: 'run-summary' },
          h(
            'dl',
            { class: 'facts' },
            item('release', run.release || '–'),
            item('request type', run.request_type || '–'),
            item('stop reason', run.stop_reason || '–'),
            item('started', dateTime(run.started_ms)),
            item('duration', duration),
            item('ceiling', isNum(run.ceiling_usd) ? usd(run.ceiling_usd) : 'none'),
            item('calls', count(run.calls)),
            item('refusals', count(run.refusals)),
            item('retries', count(run.retries)),
            item('repeated calls', count(run.repeated_calls)),
            item('estimated calls', count(run.estimated_calls)),
          ),
        ),
        panel(
          'Cost',
          { id: 'run-cost' },
          h('div', { class: 'big', 'data-value': run.cost_usd }, usd(run.cost_usd)),
          ceilingBar(run.cost_usd, run.ceiling_usd, run.breached),
          h('div', { class: 'cost-split' }, splitBar(run.llm_cost_usd, run.tool_cost_usd), h('span', null, h('span', { class: 'swatch mean' }), 'LLM ', usd(run.llm_cost_usd), '  ', h('span', { class: 'swatch tool' }), 'tool ', usd(run.tool_cost_usd))),
          h(
            'table',
            { class: 'data tokens' },
            h('thead', null, h('tr', null, ['prompt', 'cached prompt', 'cache write', 'completion', 'reasoning'].map((c) => h('th', { class: 'num' }, c)))),
            h('tbody', null, h('tr', null, ['prompt', 'cached_prompt', 'cache_write', 'completion', 'reasoning'].map((k) => h('td', { class: 'num' }, count(t[k] || 0))))),
          ),
        ),
      ),
      panel(`Calls (${calls.length}${isNum(first.total) && first.total > calls.length ? ' of ' + first.total : ''})`, { id: 'run-calls' }, callTimeline(calls, run)),
    );
  }

  function callTimeline(calls, run) {
    if (!calls.length) return h('p', { class: 'empty' }, 'No calls recorded for this run.');
    const maxLatency = Math.max(...calls.map((c) => c.latency_ms || 0)) || 1;
    const start = isNum(run.started_ms) ? run.started_ms : calls[0].ts_ms;
    const flag = (on, label, title, cls) => (on ? h('span', { class: `flag ${cls || ''}`, title }, label) : null);
    return h(
      'table',
      { id: 'calls-table', class: 'data timeline' },
      h('thead', null, h('tr', null, ['#', 'at', 'model / tool', 'status', 'tokens in / cached / out / reasoning', 'cost', 'latency', 'flags'].map((c, i) => h('th', { class: [0, 5].includes(i) ? 'num' : null }, c)))),
      h(
        'tbody',
        null,
        calls.map((c, i) => {
          const refused = c.outcome === 'refused' || c.status === 402;
          const tk = c.tokens || {};
          return h(
            'tr',
            { class: refused ? 'refused' : c.status >= 400 || (c.outcome && c.outcome !== 'complete') ? 'failed' : null, 'data-outcome': c.outcome || '' },
            h('td', { class: 'num muted' }, i + 1),
            h('td', { title: c.ts || '' }, isNum(c.ts_ms) && isNum(start) ? '+' + ms(c.ts_ms - start) : '–'),
            h('td', { class: 'key' }, c.tool ? h('span', { class: 'kind tool' }, 'tool') : h('span', { class: 'kind llm' }, 'llm'), ' ', c.tool || c.model || '–', h('span', { class: 'muted' }, c.route ? ` /${c.route}` : '')),
            h('td', null, refused ? h('span', { class: 'pill s-critical' }, `refused ${c.status || ''}`.trim()) : [String(c.status || '–'), c.outcome && c.outcome !== 'complete' ? h('span', { class: 'muted' }, ' ' + c.outcome) : null]),
            h('td', { class: 'tokens-cell' }, c.tool ? h('span', { class: 'muted' }, '–') : [count(tk.prompt || 0), h('span', { class: 'muted' }, ' / '), count(tk.cached_prompt || 0), h('span', { class: 'muted' }, ' / '), count(tk.completion || 0), h('span', { class: 'muted' }, ' / '), count(tk.reasoning || 0)]),
            h('td', { class: 'num strong', 'data-value': c.cost_usd }, usd(c.cost_usd)),
            h('td', { class: 'latency' }, h('div', { class: 'bar-track' }, h('span', { class: 'bar lat', css: { width: ((c.latency_ms || 0) / maxLatency) * 100 + '%' } })), h('span', { class: 'bar-value', title: isNum(c.ttfb_ms) ? `first byte after ${ms(c.ttfb_ms)}` : null }, ms(c.latency_ms))),
            h(
              'td',
              { class: 'flags' },
              flag(c.sdk_retry, 'retry', 'the SDK retried this call'),
              flag(c.repeat_after_failure, 'repeat', 'repeated after a failed call', 'warn'),
              flag(c.duplicate_body, 'duplicate', 'same request body as an earlier call', 'warn'),
              flag(c.estimated, 'estimated', 'no usage reported: tokens estimated', 'warn'),
              flag(c.streamed, 'stream', 'streamed response', 'quiet'),
            ),
          );
        }),
      ),
    );
  }

  // ---------- compare ----------

  async function compareView(gen, base, head, since) {
    const rel = await api('/api/segments', { by: 'release', limit: 1000, since });
    const releases = (rel.segments || []).map((s) => s.key && s.key.release).filter((r) => r !== null && r !== undefined);
    releases.sort();
    if (!head && releases.length) head = releases[releases.length - 1];
    if (!base && head) base = releases.filter((r) => r !== head).pop() || null;
    const options = (current) => releases.concat(current && !releases.includes(current) ? [current] : []).map((r) => h('option', { value: r, selected: r === current }, r));
    const baseSel = h('select', { id: 'base', 'aria-label': 'base release' }, options(base));
    const headSel = h('select', { id: 'head', 'aria-label': 'head release' }, options(head));
    const go = () => (location.hash = hashFor({ compare: '', base: baseSel.value, head: headSel.value, since }));
    baseSel.addEventListener('change', go);
    headSel.addEventListener('change', go);
    const controls = h(
      'div',
      { class: 'controls' },
      h('span', { class: 'label' }, 'Base'),
      baseSel,
      h('span', { class: 'label' }, 'Head'),
      headSel,
      h('span', { class: 'label' }, 'Window'),
      segmented(Object.keys(WINDOWS).map((w) => [w, w]), since, (w) => hashFor({ compare: '', base, head, since: w })),
    );
    if (!base || !head) {
      if (gen !== generation) return;
      app().replaceChildren(controls, h('p', { class: 'empty' }, releases.length < 2 ? 'Compare needs two releases with runs in the window.' : 'Pick two releases.'));
      return;
    }
    const data = await api('/api/compare', { base, head, since });
    if (gen !== generation) return;
    const diag = data.diagnosis || [];
    app().replaceChildren(
      controls,
      h(
        'div',
        { class: `diagnosis ${diag.length ? 'hit' : 'clear'}`, id: 'diagnosis' },
        h('span', { class: 'kpi-label' }, `${head} against ${base}: `),
        diag.length ? diag.map((d) => h('span', { class: 'pill s-warning' }, SIGNALS[d] || d)) : h('span', { class: 'pill s-ok' }, 'no regression signal matched'),
      ),
      h(
        'div',
        { class: 'grid2' },
        panel('Per run, base → head', { id: 'compare-deltas' }, compareTable(data)),
        panel('Signals', { id: 'compare-signals' }, signalList(data.signals || [])),
      ),
    );
  }

  function compareTable(data) {
    const b = data.base || {}, hd = data.head || {}, d = data.delta || {};
    return h(
      'table',
      { class: 'data' },
      h('thead', null, h('tr', null, h('th', null, 'metric'), h('th', { class: 'num' }, b.release || 'base'), h('th', { class: 'num' }, hd.release || 'head'), h('th', { class: 'num' }, 'change'), h('th', { class: 'num' }, '%'))),
      h(
        'tbody',
        null,
        COMPARE_FIELDS.map(([field, label, kind, costly]) => {
          const fmt = FORMATS[kind];
          const delta = d[field] || {};
          const p = delta.pct;
          const cls = !costly || !isNum(p) || Math.abs(p) < 0.05 ? '' : p > 0 ? 'worse' : 'better';
          return h(
            'tr',
            { 'data-field': field },
            h('td', null, label),
            h('td', { class: 'num' }, fmt(b[field])),
            h('td', { class: 'num strong' }, fmt(hd[field])),
            h('td', { class: `num ${cls}` }, isNum(delta.abs) ? (delta.abs > 0 ? '+' : '') + fmt(delta.abs) : '–'),
            h('td', { class: `num ${cls}` }, isNum(p) ? (p > 0 ? '+' : '') + p.toFixed(1) + '%' : '–'),
          );
        }),
      ),
    );
  }

  function signalList(signals) {
    if (!signals.length) return h('p', { class: 'empty' }, 'No signals.');
    const value = (k, v) => (isNum(v) ? (/pct$/.test(k) ? (v > 0 ? '+' : '') + v.toFixed(1) + '%' : /usd|cost|burn/.test(k) ? usd(v) : count(v)) : String(v));
    return h(
      'ul',
      { class: 'signals' },
      signals.map((s) =>
        h(
          'li',
          { class: s.matched ? 'matched' : 'unmatched', 'data-signal': s.name },
          h('div', { class: 'signal-head' }, h('span', { class: `pill ${s.matched ? 's-warning' : 's-none'}` }, s.matched ? 'matched' : 'no'), ' ', h('strong', null, SIGNALS[s.name] || s.name)),
          s.rule ? h('div', { class: 'rule' }, s.rule) : null,
          s.evidence && Object.keys(s.evidence).length
            ? h('div', { class: 'evidence' }, Object.entries(s.evidence).map(([k, v]) => h('span', { class: 'ev' }, h('span', { class: 'muted' }, k.replace(/_/g, ' ') + ' '), value(k, v))))
            : null,
        ),
      ),
    );
  }

  // ---------- start ----------

  document.addEventListener('DOMContentLoaded', () => {
    setupToken();
    window.addEventListener('hashchange', route);
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible' && document.body.dataset.state === 'ready') route();
    });
    route();
  });
})();
