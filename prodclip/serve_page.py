"""The search server's one web page: plain HTML and a little JavaScript, nothing fetched from elsewhere.

`PAGE` has placeholders the server fills: {{ITEMS}} (store size), {{DEFAULT_K}} and {{AUDIT_LINK}}.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>prodclip search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
  header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
  h1 { font-size: 20px; margin: 0; }
  form { display: flex; gap: 8px; margin: 16px 0; flex-wrap: wrap; align-items: center; }
  input[type=text] { width: 360px; padding: 6px; font-size: 15px; }
  input[type=number] { width: 64px; padding: 5px; }
  #status { color: #555; min-height: 20px; }
  #status.error { color: #b00020; }
  #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 16px; }
  .hit { border: 1px solid #ddd; border-radius: 6px; padding: 8px; background: #fafafa; }
  .hit img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #fff; image-rendering: pixelated; }
  .hit .title { font-size: 13px; margin-top: 6px; }
  .hit .meta { font-size: 12px; color: #666; }
</style>
</head>
<body>
<header>
  <h1>prodclip search</h1>
  <span class="meta">{{ITEMS}} items</span>
  {{AUDIT_LINK}}
</header>
<form id="text-form">
  <input id="query" type="text" name="q" placeholder="e.g. navy striped shirt" autofocus>
  <label>k <input id="k" type="number" name="k" value="{{DEFAULT_K}}" min="1"></label>
  <label><input id="rerank" type="checkbox" name="rerank"> fusion re-rank</label>
  <button id="search-button" type="submit">Search</button>
</form>
<form id="image-form">
  <label>or a photo: <input id="photo" type="file" name="file" accept="image/*"></label>
  <button id="photo-button" type="submit">Search by photo</button>
</form>
<div id="status"></div>
<div id="grid"></div>
<script>
const grid = document.getElementById("grid");
const statusLine = document.getElementById("status");

function show(message, isError) {
  statusLine.textContent = message;
  statusLine.className = isError ? "error" : "";
}

function render(result) {
  grid.innerHTML = "";
  for (const hit of result.hits) {
    const cell = document.createElement("div");
    cell.className = "hit";
    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = hit.title;
    img.loading = "lazy";
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = hit.title;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = "#" + hit.rank + " \\u00b7 score " + hit.score.toFixed(3) + " \\u00b7 id " + hit.id;
    cell.append(img, title, meta);
    grid.append(cell);
  }
  show(result.hits.length + " results for " + result.query + " (" + result.took_ms.toFixed(1) + " ms, "
       + result.search + (result.rerank ? ", re-ranked" : "") + ")", false);
}

async function run(request) {
  show("searching\\u2026", false);
  try {
    const response = await fetch(request.url, request.init);
    const body = await response.json();
    if (!response.ok) { grid.innerHTML = ""; show(body.error || ("error " + response.status), true); return; }
    render(body);
  } catch (e) {
    show("the server did not answer: " + e, true);
  }
}

document.getElementById("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run({url: "/api/search", init: {method: "POST", headers: {"Content-Type": "application/json"},
       body: JSON.stringify({q: document.getElementById("query").value,
                             k: Number(document.getElementById("k").value),
                             rerank: document.getElementById("rerank").checked})}});
});

document.getElementById("image-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const file = document.getElementById("photo").files[0];
  if (!file) { show("choose a photo first", true); return; }
  const form = new FormData();
  form.append("file", file);
  form.append("k", document.getElementById("k").value);
  form.append("rerank", document.getElementById("rerank").checked);
  run({url: "/api/search/image", init: {method: "POST", body: form}});
});
</script>
</body>
</html>
"""
