/**
 * The rotation dashboard: lists rotation jobs and follows the selected one
 * live through WatchRotation over gRPC-Web (Connect's gRPC-Web transport,
 * messages from proto/ by protoc-gen-es). It talks to the server it was
 * served from (`keyward serve --dashboard-dir`), or to `?api=URL` (that
 * server must then list this page's origin in --cors-allowed-origins).
 *
 * The admin token is typed in (or given once as `?token=`, then removed
 * from the address bar) and kept in sessionStorage only.
 */

import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { Admin, type RotationJob, type RotationProgress, RotationStatus } from "./gen/keyward/v1/admin_pb.js";

const params = new URLSearchParams(location.search);
const baseUrl = params.get("api") ?? location.origin;
if (params.has("token")) {
  sessionStorage.setItem("keyward-token", params.get("token") ?? "");
  params.delete("token");
  history.replaceState(null, "", `${location.pathname}${params.size ? `?${params}` : ""}${location.hash}`);
}

const bearer: Interceptor = (next) => (req) => {
  const token = sessionStorage.getItem("keyward-token");
  if (token) req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};
const admin = createClient(Admin, createGrpcWebTransport({ baseUrl, interceptors: [bearer] }));

const $ = <T extends Element = HTMLElement>(selector: string) => document.querySelector(selector) as T;
const field = (id: string) => $(`[data-testid="${id}"]`);

function statusName(status: RotationStatus): string {
  return (RotationStatus[status] ?? "UNKNOWN").replace("ROTATION_STATUS_", "").toLowerCase();
}

function showError(err: unknown): void {
  const box = field("error");
  if (err === undefined) {
    box.hidden = true;
    return;
  }
  const e = ConnectError.from(err);
  box.textContent =
    e.code === Code.Unauthenticated || e.code === Code.PermissionDenied
      ? `${e.rawMessage} — enter an admin token above`
      : e.rawMessage;
  box.hidden = false;
}

let selected: string | undefined = location.hash.slice(1) || undefined;
let watching: AbortController | undefined;
const rates: number[] = [];

async function refreshJobs(): Promise<void> {
  try {
    const { jobs } = await admin.listRotationJobs({ limit: 50 });
    showError(undefined);
    const body = field("jobs");
    body.replaceChildren(...jobs.map(jobRow));
    if (!selected && jobs[0]) select(jobs[0].id);
  } catch (err) {
    showError(err);
  }
}

function jobRow(job: RotationJob): HTMLTableRowElement {
  const row = document.createElement("tr");
  row.dataset.testid = "job-row";
  row.dataset.jobId = job.id;
  if (job.id === selected) row.classList.add("selected");
  const created = job.createdAt ? new Date(Number(job.createdAt.seconds) * 1000).toLocaleTimeString() : "";
  for (const text of [job.id.slice(0, 8), statusName(job.status), `${job.processedRows}/${job.totalRows}`, created]) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  row.addEventListener("click", () => select(job.id));
  return row;
}

function select(jobId: string): void {
  selected = jobId;
  history.replaceState(null, "", `${location.pathname}${location.search}#${jobId}`);
  for (const row of document.querySelectorAll<HTMLElement>("[data-testid=job-row]")) {
    row.classList.toggle("selected", row.dataset.jobId === jobId);
  }
  void watch(jobId);
}

async function watch(jobId: string): Promise<void> {
  watching?.abort();
  const controller = new AbortController();
  watching = controller;
  rates.length = 0;
  field("job").hidden = false;
  try {
    for await (const progress of admin.watchRotation({ jobId }, { signal: controller.signal })) {
      render(progress);
    }
  } catch (err) {
    if (!controller.signal.aborted) showError(err);
  }
}

function render(progress: RotationProgress): void {
  const job = progress.job;
  if (!job) return;
  const total = Number(job.totalRows);
  const processed = Number(job.processedRows);
  field("job-id").textContent = job.id;
  field("status").textContent = statusName(job.status);
  field("pass").textContent = `${job.pass}`;
  field("target").textContent = job.targetKeyId || job.targetEncryptionKeyId;
  field("total").textContent = `${total}`;
  field("processed").textContent = `${processed}`;
  field("succeeded").textContent = `${job.succeededRows}`;
  field("failed").textContent = `${job.failedRows}`;
  field("skipped").textContent = `${job.skippedRows}`;
  field("rate").textContent = progress.rowsPerSecond.toFixed(0);
  field("eta").textContent = progress.etaSeconds < 0 ? "–" : `${progress.etaSeconds.toFixed(0)} s`;
  field("last-error").textContent = job.lastError || "none";
  // Paused by an operator, or slowed by its latency budget or a standby.
  field("throttle").textContent = job.throttled ? job.throttleReason : "no";
  const percent = total > 0 ? Math.min(100, (100 * processed) / total) : progress.terminal ? 100 : 0;
  field("bar-fill").style.width = `${percent}%`;
  field("progressbar").setAttribute("aria-valuenow", percent.toFixed(0));
  rates.push(progress.rowsPerSecond);
  drawChart();
  if (progress.terminal) void refreshJobs();
}

function drawChart(): void {
  const line = $<SVGPolylineElement>("#chart polyline");
  const max = Math.max(1, ...rates);
  // One sample so far: a flat line at its height.
  const samples = rates.length === 1 ? [rates[0], rates[0]] : rates;
  const step = samples.length > 1 ? 600 / (samples.length - 1) : 0;
  line.setAttribute(
    "points",
    samples.map((r, i) => `${(i * step).toFixed(1)},${(115 - (r / max) * 110).toFixed(1)}`).join(" "),
  );
}

$("#auth").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("keyward-token", $<HTMLInputElement>("#token").value.trim());
  $<HTMLInputElement>("#token").value = "";
  void refreshJobs();
  if (selected) void watch(selected);
});

void refreshJobs();
if (selected) void watch(selected);
setInterval(() => void refreshJobs(), 2000);
