// Swagger UI for this server's /openapi.json. A file, not an inline script: the page's CSP allows
// scripts from this origin only. No validator badge (it would fetch from a third-party site);
// the key typed into "Authorize" stays in the page's memory (persistAuthorization off).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  presets: [SwaggerUIBundle.presets.apis],
  deepLinking: true,
  validatorUrl: null,
  persistAuthorization: false,
});
