// CXR Triage worklist page: plain ES module, no build step, no third-party code.
// Every data call goes to the authenticated API with the user's API key or OpenID Connect access token
// (Authorization: Bearer); nothing from the API is ever inserted as HTML (textContent only).

const config = JSON.parse(document.getElementById("cxr-config").textContent);
const store = window.sessionStorage; // per tab, gone when the tab closes
const TOKEN = "cxr.token";
const METHOD = "cxr.method";
const OIDC_PENDING = "cxr.oidc.pending";

const LEVELS = {
  critical: "Critical",
  urgent: "Urgent",
  not_analysed: "Not analysed",
  routine: "Routine",
  minor: "Minor",
  nothing_flagged: "Nothing flagged",
  awaiting_analysis: "Awaiting analysis",
};
const STATUS_TEXT = {
  DONE: "Done",
  SKIPPED: "Skipped",
  FAILED: "Failed",
  RECEIVING: "Receiving",
  READY: "Ready",
  PROCESSING: "Processing",
};

const state = {
  me: null,
  offset: 0,
  timer: null,
  lastCount: 0,
  objectUrls: [],
};

// --- small helpers -------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** An element with attributes (``text`` sets textContent, ``on<Event>`` adds listeners) and children. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style") Object.assign(node.style, value); // CSSOM: allowed by the page's CSP
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function formatDuration(ms) {
  const minutes = Math.max(0, Math.floor(ms / 60000));
  const days = Math.floor(minutes / 1440);
  const hours = Math.floor((minutes % 1440) / 60);
  const mins = minutes % 60;
  if (days) return `${days} d ${hours} h`;
  if (hours) return `${hours} h ${String(mins).padStart(2, "0")} min`;
  return `${mins} min`;
}

function formatTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function formatDate(dicomDate) {
  return /^\d{8}$/.test(dicomDate || "") ? `${dicomDate.slice(0, 4)}-${dicomDate.slice(4, 6)}-${dicomDate.slice(6)}` : "";
}

/** DICOM PN ("Family^Given^Middle^Prefix^Suffix", groups split by "=") as people write it. */
function formatName(pn) {
  if (!pn) return "";
  return pn.split("=").filter(Boolean).map((group) => {
    const [family = "", given = "", middle = "", prefix = "", suffix = ""] = group.split("^");
    const rest = [prefix, given, middle, suffix].filter(Boolean).join(" ");
    return family && rest ? `${family}, ${rest}` : family || rest;
  }).join(" / ");
}

const pct = (p) => p.toFixed(2);

function levelBadge(priority) {
  return el("span", { class: `badge level-${priority.name}`, text: LEVELS[priority.name] || priority.name });
}

function statusBadge(status) {
  return el("span", { class: `badge status-${status}`, text: STATUS_TEXT[status] || status });
}

function clearObjectUrls() {
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
}

function setDemoBanner(on) {
  $("demo-banner").hidden = !on;
}

// --- the API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const token = store.getItem(TOKEN);
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.ok) return response;
  let detail = response.statusText;
  try {
    detail = (await response.json()).detail || detail;
  } catch (_) { /* not JSON */ }
  if (response.status === 401) {
    signOut(`Your sign-in is no longer valid (${detail}). Please sign in again.`);
  }
  throw new ApiError(response.status, detail);
}

const getJson = async (path) => (await api(path)).json();

// --- signing in ----------------------------------------------------------------------------------

function base64url(bytes) {
  let text = "";
  for (const b of new Uint8Array(bytes)) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString(bytes = 32) {
  return base64url(crypto.getRandomValues(new Uint8Array(bytes)));
}

function redirectUri() {
  return window.location.origin + window.location.pathname;
}

async function discovery() {
  const issuer = config.oidc.issuer.replace(/\/$/, "");
  const response = await fetch(`${issuer}/.well-known/openid-configuration`, { cache: "no-store" });
  if (!response.ok) throw new Error(`the identity provider's discovery document answered ${response.status}`);
  const doc = await response.json();
  if (doc.issuer !== config.oidc.issuer) throw new Error("the identity provider names another issuer");
  return doc;
}

/** Authorization code flow with PKCE (RFC 7636) as a public client: no secret in the page. */
async function startOidc() {
  const doc = await discovery();
  const verifier = randomString(48);
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  const pending = { state: randomString(16), nonce: randomString(16), verifier, token_endpoint: doc.token_endpoint,
                    hash: window.location.hash };
  store.setItem(OIDC_PENDING, JSON.stringify(pending));
  const url = new URL(doc.authorization_endpoint);
  url.search = new URLSearchParams({
    response_type: "code",
    client_id: config.oidc.client_id,
    redirect_uri: redirectUri(),
    scope: config.oidc.scopes,
    state: pending.state,
    nonce: pending.nonce,
    code_challenge: challenge,
    code_challenge_method: "S256",
  }).toString();
  window.location.assign(url.toString());
}

/** Back from the identity provider with ?code=&state= (or ?error=): trade the code for tokens. */
async function finishOidc(params) {
  const pending = JSON.parse(store.getItem(OIDC_PENDING) || "null");
  store.removeItem(OIDC_PENDING);
  window.history.replaceState(null, "", redirectUri() + (pending?.hash || "#/"));
  if (params.get("error")) {
    throw new Error(`the identity provider refused: ${params.get("error_description") || params.get("error")}`);
  }
  if (!pending || params.get("state") !== pending.state) {
    throw new Error("the sign-in answer does not match a sign-in started here (state mismatch); try again");
  }
  const response = await fetch(pending.token_endpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code: params.get("code"),
      redirect_uri: redirectUri(),
      client_id: config.oidc.client_id,
      code_verifier: pending.verifier,
    }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok || !body.access_token) {
    throw new Error(`the identity provider gave no token: ${body.error_description || body.error || response.status}`);
  }
  store.setItem(TOKEN, body.access_token);
  store.setItem(METHOD, "oidc");
}

function signOut(message = "") {
  stopRefresh();
  store.removeItem(TOKEN);
  store.removeItem(METHOD);
  state.me = null;
  showLogin(message);
}

function showLogin(message = "") {
  showView("login-view");
  $("session").hidden = true;
  $("login-message").textContent = message;
  $("oidc-login").hidden = !config.oidc;
  if (config.oidc) $("oidc-issuer").textContent = new URL(config.oidc.issuer).host;
  $("api-key").value = "";
}

async function loadMe() {
  state.me = await getJson("me");
  $("session").hidden = false;
  $("session-user").textContent = `${state.me.name} (${state.me.roles.join(", ") || "no role"})`;
}

// --- views ---------------------------------------------------------------------------------------

function showView(id) {
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== id;
}

async function route() {
  if (!store.getItem(TOKEN)) {
    showLogin($("login-message").textContent);
    return;
  }
  try {
    if (!state.me) await loadMe();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showLogin(`Cannot reach the API: ${error.message}`);
    return;
  }
  if (!state.me.permissions.includes("read_studies")) {
    stopRefresh();
    showLogin(`Signed in as ${state.me.name}, whose role (${state.me.roles.join(", ") || "none"}) may not read studies.`);
    $("session").hidden = false;
    return;
  }
  const match = window.location.hash.match(/^#\/study\/([0-9.]+)$/);
  if (match) {
    stopRefresh();
    await showStudy(match[1]);
  } else {
    clearObjectUrls();
    showView("worklist-view");
    await loadWorklist();
  }
}

// --- worklist ------------------------------------------------------------------------------------

function worklistQuery() {
  const params = new URLSearchParams();
  const read = $("f-read").value;
  if (read) params.set("read", read);
  if ($("f-status").value) params.append("status", $("f-status").value);
  const finding = $("f-finding").value.trim();
  if (finding) params.set("finding", finding);
  // Dates are the reader's local days, sent as instants.
  if ($("f-from").value) params.set("received_from", new Date(`${$("f-from").value}T00:00:00`).toISOString());
  if ($("f-to").value) params.set("received_to", new Date(`${$("f-to").value}T23:59:59.999`).toISOString());
  params.set("limit", $("f-size").value);
  params.set("offset", String(state.offset));
  return params;
}

function stopRefresh() {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
}

function scheduleRefresh() {
  stopRefresh();
  state.timer = setTimeout(() => {
    if (document.hidden || $("worklist-view").hidden) scheduleRefresh();
    else loadWorklist();
  }, config.refresh_seconds * 1000);
}

async function loadWorklist() {
  stopRefresh();
  $("worklist-error").textContent = "";
  try {
    const body = await getJson(`worklist?${worklistQuery()}`);
    renderWorklist(body);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return;
    $("worklist-error").textContent = `The worklist could not be loaded: ${error.message}`;
  }
  if (store.getItem(TOKEN)) scheduleRefresh();
}

function findingsCell(item) {
  if (item.priority.analysis === "not_analysed") return el("span", { class: "none", text: "not analysed" });
  if (item.priority.analysis === "awaiting_analysis") return el("span", { class: "none", text: "awaiting analysis" });
  if (!item.top_findings.length) return el("span", { class: "none", text: "nothing flagged" });
  return el("ul", { class: "findings-list" }, item.top_findings.map((f) =>
    el("li", {}, `${f.finding} ${pct(f.probability)} / ${pct(f.threshold)} `,
      el("span", { class: "sub-inline", text: `(${f.urgency || "unclassified"})` }))));
}

function exportCell(item) {
  const e = item.export;
  if (!e.status) return el("span", { class: "none", text: "none" });
  const text = { EXPORTED: "Sent", EXPORT_PENDING: "Pending", EXPORT_FAILED: "Failed" }[e.status] || e.status;
  return el("span", {}, text, el("span", { class: "sub", text: `${e.exported} of ${e.total} destination(s)` }));
}

function worklistRow(item, asOf) {
  const uid = item.study_instance_uid;
  const p = item.priority;
  const href = `#/study/${uid}`;
  const age = formatDuration(asOf - new Date(item.received_at));
  const model = item.model
    ? el("span", {}, `${item.model.name} ${item.model.version}`, item.model.demo ? el("span", { class: "demo-tag", text: "DEMO" }) : null)
    : el("span", { class: "none", text: "-" });
  const row = el("tr", { dataset: { uid }, class: p.waiting ? "" : "read" },
    el("td", { class: "nowrap" }, levelBadge(p),
      p.escalated ? el("span", { class: "escalated", text: "raised by age" }) : null,
      p.waiting ? null : el("span", { class: "sub", text: "read" }),
      el("details", { class: "why" }, el("summary", { text: "Why?" }), el("p", { text: p.explanation }))),
    el("td", {}, el("a", { class: "open", href, text: item.accession_number || "(no accession)",
      "aria-label": `Open study ${item.accession_number || uid}` })),
    el("td", {}, formatName(item.patient_name) || el("span", { class: "none", text: "(no name)" }),
      el("span", { class: "sub", text: item.patient_id ? `ID ${item.patient_id}` : "" })),
    el("td", { class: "nowrap" }, age),
    el("td", {}, statusBadge(item.status), item.status_reason ? el("span", { class: "reason", text: item.status_reason }) : null),
    el("td", {}, findingsCell(item)),
    el("td", {}, model),
    el("td", {}, exportCell(item)),
  );
  row.addEventListener("click", (event) => {
    if (event.target.closest("a, summary, details")) return;
    window.location.hash = href;
  });
  return row;
}

function renderWorklist(body) {
  const focused = document.activeElement?.closest?.("tr")?.dataset?.uid;
  const asOf = new Date(body.as_of);
  const rows = $("worklist-rows");
  rows.replaceChildren(...body.data.map((item) => worklistRow(item, asOf)));
  if (!body.data.length) {
    rows.append(el("tr", {}, el("td", { colspan: 8, class: "none", text: "No study matches." })));
  }
  if (focused) rows.querySelector(`tr[data-uid="${CSS.escape(focused)}"] a.open`)?.focus();
  const limit = Number($("f-size").value);
  const total = body.count;
  const first = body.data.length ? state.offset + 1 : 0;
  const last = state.offset + body.data.length;
  $("page-info").textContent = `Studies ${first}-${last} of ${total}${body.count_exact ? "" : "+"}`;
  $("prev-page").disabled = state.offset === 0;
  $("next-page").disabled = last >= total && body.count_exact;
  state.lastCount = total;
  $("worklist-status").textContent =
    `${total}${body.count_exact ? "" : "+"} studies · updated ${asOf.toLocaleTimeString()} · refreshes every ${config.refresh_seconds} s`;
  setDemoBanner(body.disclaimer.includes("DEMO") || body.data.some((i) => i.model?.demo));
  const m = body.policy.escalation_minutes;
  const h = (key) => formatDuration(m[key] * 60000);
  $("policy-text").textContent =
    "Studies waiting to be read come first, by level: critical, urgent, not analysed (skipped or failed: no AI " +
    "opinion), routine, minor, nothing flagged. A finding's level comes from the model card's urgency class, " +
    "and a study never loses a level it had. Within a level, the study waiting longest comes first. While " +
    `unread, a study climbs one level after waiting ${h("nothing_flagged")} (nothing flagged), ${h("minor")} ` +
    `(minor), ${h("routine")} (routine), ${h("not_analysed")} (not analysed), up to ${LEVELS[body.policy.ceiling]}; ` +
    `a study still awaiting analysis after ${h("awaiting_analysis")} counts as not analysed. Read studies follow, ` +
    "most recently read first.";
}

// --- one study -----------------------------------------------------------------------------------

function dl(pairs) {
  return el("dl", { class: "summary" }, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
}

function table(caption, headers, rows) {
  return el("table", {},
    el("caption", { class: "visually-hidden", text: caption }),
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows));
}

async function loadImage(img, caption, path) {
  try {
    const blob = await (await api(path, { headers: { Accept: "image/png" } })).blob();
    const url = URL.createObjectURL(blob);
    state.objectUrls.push(url);
    img.src = url;
  } catch (error) {
    img.remove();
    caption.append(el("span", { class: "sub", text: ` (cannot be shown: ${error.message})` }));
  }
}

function figure(path, alt, captionText) {
  const img = el("img", { alt });
  const caption = el("figcaption", { text: captionText });
  const fig = el("figure", {}, img, caption);
  loadImage(img, caption, path);
  return fig;
}

function findingsTable(image) {
  return table(`All findings of image ${image.sop_instance_uid}`,
    ["Finding", "Probability", "Threshold", "Flagged", "Urgency", "Probability against threshold"],
    image.findings.map((f) => el("tr", { class: f.present ? "flagged" : "" },
      el("th", { scope: "row", text: f.finding }),
      el("td", { text: pct(f.probability) }),
      el("td", { text: pct(f.threshold) }),
      el("td", { text: f.present ? "yes" : "no" }),
      el("td", { text: f.urgency || "-" }),
      el("td", {}, el("div", { class: "bar", "aria-hidden": "true" },
        el("div", { class: `bar-fill${f.present ? " flagged" : ""}`, style: { width: `${(f.probability * 100).toFixed(1)}%` } }),
        el("div", { class: "bar-threshold", style: { left: `${(f.threshold * 100).toFixed(1)}%` } }))))));
}

async function toggleRead(study, button) {
  button.disabled = true;
  try {
    await api(`studies/${study.study_instance_uid}/read`, { method: study.read_at ? "DELETE" : "PUT" });
    await showStudy(study.study_instance_uid);
  } catch (error) {
    $("study-error").textContent = `Could not change the read state: ${error.message}`;
    button.disabled = false;
  }
}

async function showStudy(uid) {
  clearObjectUrls();
  showView("study-view");
  $("study-error").textContent = "";
  const content = $("study-content");
  content.replaceChildren(el("p", { text: "Loading..." }));
  let study;
  try {
    study = await getJson(`studies/${uid}`);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) {
      content.replaceChildren();
      $("study-error").textContent = `The study could not be loaded: ${error.message}`;
    }
    return;
  }
  setDemoBanner(Boolean(study.model?.demo));
  const p = study.priority;
  const notAnalysed = p.analysis === "not_analysed";
  const readButton = el("button", { type: "button", class: "button-primary",
    text: study.read_at ? "Mark as not read" : "Mark as read" });
  readButton.addEventListener("click", () => toggleRead(study, readButton));

  const heading = el("h1", { id: "study-title", tabindex: "-1" },
    `Study ${study.accession_number || study.study_instance_uid}`);
  const sections = [
    el("div", { class: "study-head" }, heading, levelBadge(p), statusBadge(study.status)),
    dl([
      ["Patient", formatName(study.patient_name)],
      ["Patient ID", study.patient_id],
      ["Accession", study.accession_number],
      ["Study date", formatDate(study.study_date)],
      ["Description", study.study_description],
      ["Received", `${formatTime(study.received_at)} (${formatDuration(Date.now() - new Date(study.received_at))} ago)`],
      ["Status", `${STATUS_TEXT[study.status] || study.status}${study.status_reason ? `: ${study.status_reason}` : ""}`],
      ["Model", study.model ? `${study.model.name} ${study.model.version}${study.model.demo ? " (DEMO WEIGHTS)" : ""}` : "not analysed by a model"],
      ["Read", study.read_at ? `${formatTime(study.read_at)} by ${study.read_by}` : "not yet"],
      ["Study Instance UID", study.study_instance_uid],
    ]),
    el("section", { class: `panel${notAnalysed ? (study.status === "FAILED" ? " panel-failed" : " panel-not-analysed") : ""}`,
      "aria-labelledby": "priority-title" },
      el("h2", { id: "priority-title", text: "Priority" }),
      el("p", {}, levelBadge(p), p.escalated ? el("span", { class: "escalated", text: "raised by age" }) : null),
      el("p", { id: "priority-explanation", text: p.explanation })),
    el("div", { class: "actions" }, readButton,
      study.viewer_url ? el("a", { href: study.viewer_url, target: "_blank", rel: "noopener noreferrer", id: "viewer-link",
        text: "Open in the hospital viewer" }) : null),
  ];

  // The frontal chest radiographs (those the model takes), then one heatmap per flagged finding
  // (rendered PNGs from DICOMweb).
  const analysed = study.instances.filter((i) => i.eligible);
  const heatmaps = study.results.filter((r) => r.kind === "HEATMAP");
  const probability = {};
  for (const image of study.images) for (const f of image.findings) probability[`${image.sop_instance_uid}|${f.finding}`] = f;
  const figures = [
    ...analysed.map((i) => figure(
      `dicomweb/studies/${uid}/series/${i.series_instance_uid}/instances/${i.sop_instance_uid}/rendered`,
      `Radiograph ${i.sop_instance_uid}`, `Radiograph (${i.modality || "image"})`)),
    ...heatmaps.map((r) => {
      const f = probability[`${r.source_sop_instance_uid}|${r.finding}`];
      const numbers = f ? ` ${pct(f.probability)} (threshold ${pct(f.threshold)})` : "";
      return figure(`dicomweb/studies/${uid}/series/${r.series_instance_uid}/instances/${r.sop_instance_uid}/rendered`,
        `Heatmap of ${r.finding || "the findings"} over the radiograph`, `Heatmap: ${r.finding || "summary"}${numbers}`);
    }),
  ];
  sections.push(el("section", { "aria-labelledby": "images-title" },
    el("h2", { id: "images-title", text: "Radiograph and heatmaps" }),
    figures.length ? el("div", { class: "gallery" }, figures)
      : el("p", { class: "none", text: "No radiograph the model could take: see the received images below." })));

  sections.push(el("section", { "aria-labelledby": "findings-title" },
    el("h2", { id: "findings-title", text: "All findings against their operating thresholds" }),
    study.images.length ? study.images.map((image) => el("div", { class: "table-wrap" },
      study.images.length > 1 ? el("h3", { text: `Image ${image.sop_instance_uid}` }) : null, findingsTable(image)))
      : el("p", { class: "none", text: "No probabilities: the study was not analysed." })));

  const srPre = el("pre", { class: "sr-text", tabindex: "0", "aria-label": "Structured report content" }, "Loading...");
  sections.push(el("section", { "aria-labelledby": "sr-title" },
    el("h2", { id: "sr-title", text: "Structured report" }), srPre));

  sections.push(el("section", { "aria-labelledby": "exports-title" },
    el("h2", { id: "exports-title", text: "Export to PACS, per destination" }),
    study.exports.length ? el("div", { class: "table-wrap" }, table("Export status per destination",
      ["Destination", "Status", "Attempts", "Last error", "Next attempt", "Updated"],
      study.exports.map((e) => el("tr", {},
        el("th", { scope: "row", text: e.destination }),
        el("td", { text: { EXPORTED: "Sent", EXPORT_PENDING: "Pending", EXPORT_FAILED: "Failed (gave up)" }[e.status] || e.status }),
        el("td", { text: String(e.attempts) }),
        el("td", { text: e.last_error || "-" }),
        el("td", { text: e.next_attempt_at ? formatTime(e.next_attempt_at) : "-" }),
        el("td", { text: formatTime(e.updated_at) })))))
      : el("p", { class: "none", text: "No export: no destination configured, or no result to send." })));

  sections.push(el("section", { "aria-labelledby": "instances-title" },
    el("h2", { id: "instances-title", text: "Received images" }),
    el("div", { class: "table-wrap" }, table("Received images and whether the model takes each",
      ["SOP Instance UID", "Modality", "Eligible (frontal chest)", "Why not"],
      study.instances.map((i) => el("tr", {},
        el("td", { text: i.sop_instance_uid }),
        el("td", { text: i.modality || "-" }),
        el("td", { text: i.eligible === null ? "not checked yet" : i.eligible ? "yes" : "no" }),
        el("td", { text: i.eligibility_reason || "-" })))))));

  if (study.jobs.some((j) => j.error)) {
    sections.push(el("section", { "aria-labelledby": "jobs-title" },
      el("h2", { id: "jobs-title", text: "Analysis attempts" }),
      el("div", { class: "table-wrap" }, table("Analysis jobs", ["Job", "Status", "Attempts", "Error"],
        study.jobs.map((j) => el("tr", {}, el("td", { text: String(j.id) }), el("td", { text: j.status }),
          el("td", { text: String(j.attempts) }), el("td", { text: j.error || "-" })))))));
  }
  sections.push(el("p", { class: "help", text: study.disclaimer }));
  content.replaceChildren(...sections);
  heading.focus();

  if (!study.results.some((r) => r.kind === "SR")) {
    srPre.textContent = "No structured report: the model has not analysed this study.";
    return;
  }
  try {
    const sr = await getJson(`studies/${uid}/sr/content`);
    srPre.textContent = sr.text;
  } catch (error) {
    srPre.textContent = `Cannot be shown: ${error.message}`;
  }
}

// --- wiring --------------------------------------------------------------------------------------

$("version").textContent = `CXR Triage ${config.version}`;

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  store.setItem(TOKEN, key);
  store.setItem(METHOD, "api-key");
  state.me = null;
  $("login-message").textContent = "";
  await route();
});

$("oidc-button").addEventListener("click", () => {
  startOidc().catch((error) => { $("login-message").textContent = `Single sign-on failed: ${error.message}`; });
});

$("logout").addEventListener("click", () => signOut("You have signed out."));

$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  state.offset = 0;
  loadWorklist();
});
$("filters").addEventListener("reset", () => {
  setTimeout(() => { state.offset = 0; loadWorklist(); }, 0);
});
$("refresh").addEventListener("click", () => loadWorklist());
$("prev-page").addEventListener("click", () => {
  state.offset = Math.max(0, state.offset - Number($("f-size").value));
  loadWorklist();
});
$("next-page").addEventListener("click", () => {
  state.offset += Number($("f-size").value);
  loadWorklist();
});
window.addEventListener("hashchange", route);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && !$("worklist-view").hidden && store.getItem(TOKEN)) loadWorklist();
});

(async () => {
  const params = new URLSearchParams(window.location.search);
  if (config.oidc && (params.has("code") || params.has("error"))) {
    try {
      await finishOidc(params);
    } catch (error) {
      showLogin(`Single sign-on failed: ${error.message}`);
      return;
    }
  }
  await route();
})();
