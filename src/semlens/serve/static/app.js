// semlens web app: live progress of a running apply (the page works without this script too).
(function () {
  const job = document.getElementById("job");
  if (!job || job.dataset.state !== "running") return;
  const bar = document.getElementById("progress");
  const state = document.getElementById("job-state");
  const step = document.getElementById("job-step");
  const result = document.getElementById("job-result");
  async function poll() {
    const r = await fetch("/apply/status.json", { headers: { accept: "application/json" } });
    const s = await r.json();
    bar.max = s.steps; bar.value = s.step;
    state.textContent = s.state; step.textContent = s.step + "/" + s.steps;
    job.dataset.state = s.state;
    if (s.state === "running") { setTimeout(poll, 250); return; }
    result.textContent = "";
    if (s.version) {
      const a = document.createElement("a");
      a.href = "/v/" + s.version + "/"; a.textContent = s.version;
      result.append("new version ", a);
    } else if (s.error) { result.textContent = s.error; }
  }
  poll();
})();
