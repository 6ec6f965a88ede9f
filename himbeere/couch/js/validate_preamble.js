  var NODE = __NODE_ROLE__, DEPLOYER = __DEPLOYER_ROLE__;
  var roles = userCtx.roles || [];
  function has(role) { return roles.indexOf(role) !== -1; }
  function listed(section) {
    section = section || {};
    if ((section.names || []).indexOf(userCtx.name) !== -1) { return true; }
    var wanted = section.roles || [];
    for (var i = 0; i < wanted.length; i++) { if (has(wanted[i])) { return true; } }
    return false;
  }
  function refuse(why) { throw({forbidden: why}); }
  // A name of digits is a MAC id: a node, whatever roles it claims (see below).
  var isNode = has(NODE) || /^[0-9]+$/.test(String(userCtx.name || ''));
  if (has('_admin') || (!isNode && (has(DEPLOYER) || listed((secObj || {}).admins)))) {
    return;
  }
  if (!userCtx.name) { throw({unauthorized: 'log in to write to this database'}); }
  if (!isNode) {
    refuse('only admins, deployers (role ' + DEPLOYER + ') and nodes (role ' + NODE +
           ') may write here; ' + userCtx.name + ' has neither role');
  }
  var me = String(userCtx.name);
