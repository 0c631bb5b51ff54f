// The dashboard's only script besides htmx (the CSP allows no inline script).
// htmx's config is also in each page's <meta name="htmx-config">; this repeats it in case
// that tag is missing: no eval (hx-on, js: expressions), no injected indicator <style>.
if (window.htmx) {
  htmx.config.allowEval = false;
  htmx.config.includeIndicatorStyles = false;
  htmx.config.allowScriptTags = false;
}
// Buttons that cancel or disable ask first.
document.addEventListener("submit", function (e) {
  var b = e.submitter;
  if (b && (b.id === "cancel") && !window.confirm("Cancel this run?")) {
    e.preventDefault();
  }
});
