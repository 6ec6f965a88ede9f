function (doc, req) {
  if (doc._deleted) { return true; }
  var mac = String(req.query.mac);
  var type = String(doc.type);
  if (type === mac || type === 'himbeere-placed' || doc.global_modules) { return true; }
  if (String(req.query.kind) === 'code') { return false; }
  if (type === 'himbeere-command') {
    var targets = doc.targets;
    if (targets === 'all') { return true; }
    if (Object.prototype.toString.call(targets) !== '[object Array]') { return false; }
    for (var i = 0; i < targets.length; i++) {
      if (String(targets[i]) === mac) { return true; }
    }
    return false;
  }
  return type === mac + '_cmd';
}
