function (doc) {
  if (doc.type !== undefined && doc.type !== null && /_cmd$/.test(String(doc.type))) { return; }
  var hasModules = doc.modules !== null && typeof doc.modules === 'object';
  var hasGlobals = doc.global_modules !== null && typeof doc.global_modules === 'object';
  if (typeof doc.code !== 'string' && !hasModules && !hasGlobals) { return; }
  var node = (doc.type === undefined || doc.type === null) ? null : String(doc.type);
  var modules = [], globals = [], key;
  if (typeof doc.code === 'string') { modules.push('main'); }
  if (hasModules) { for (key in doc.modules) { modules.push(key); } }
  if (hasGlobals) { for (key in doc.global_modules) { globals.push(key); } }
  var value = {modules: modules, global_modules: globals, enabled: doc.enabled !== false};
  if (doc.type === 'himbeere-program') { value.targets = doc.targets; }
  emit([node, doc.name || doc._id], value);
}
